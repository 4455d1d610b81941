"""Recipes: every file under recipes/ validates; unknown keys and wrong types are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from hfprune.pipeline.recipe import DEFAULT_RECIPE_YAML, RecipeError, load_recipe, parse_overrides, recipe_files

ROOT = Path(__file__).resolve().parents[1]
RECIPES = recipe_files(ROOT / "recipes")
BASE = {"name": "t", "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}}


def test_recipes_exist():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"minilm/movie-sentiment/oneshot.yaml", "minilm/movie-sentiment/gradual-distill.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.method in ("oneshot", "gradual")
    assert len(path.relative_to(ROOT / "recipes").parts) == 3, "recipes/<model>/<task>/<variant>.yaml"
    if recipe.method == "gradual":
        assert recipe.training and recipe.schedule is not None


def test_default_recipe_is_the_shipped_oneshot_file():
    shipped = yaml.safe_load((ROOT / "recipes/minilm/movie-sentiment/oneshot.yaml").read_text())
    assert shipped == yaml.safe_load(DEFAULT_RECIPE_YAML)
    recipe = load_recipe(None)
    assert (recipe.pruning.criterion, recipe.pruning.macs_ratio) == ("fisher", 0.6)


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "prunning": {}}, "unknown key 'prunning' (did you mean 'pruning'?); allowed: data, description"),
    ({**BASE, "pruning": {"macs_ration": 0.5}}, "unknown key pruning.macs_ration (did you mean 'macs_ratio'?)"),
    ({**BASE, "model": {"pth": "x"}},
     "unknown key model.pth (did you mean 'path'?); allowed: base_model, dtype, num_labels"),
    ({**BASE, "method": "gradual", "training": {"learning_rat": 1e-4}}, "unknown key training.learning_rat"),
    ({**BASE, "pruning": {"macs_ratio": "half"}}, "pruning.macs_ratio: expected float | None, got 'half'"),
    ({**BASE, "evaluation": {"batch_size": 1.5}}, "evaluation.batch_size: expected int, got 1.5"),
    ({**BASE, "evaluation": {"metrics": "accuracy"}}, "evaluation.metrics: expected list"),
    ({**BASE, "output": {"plots": "yes"}}, "output.plots: expected bool, got 'yes'"),
    ({**BASE, "pruning": {"macs_ratio": 1.5}}, "pruning: macs_ratio=1.5 must be in (0, 1]"),
    ({**BASE, "model": {"task": "translation"}}, "model.task='translation'; choose one of"),
    ({**BASE, "method": "cubic"}, "method='cubic'; choose one of ('oneshot', 'gradual')"),
    ({**BASE, "training": {"learning_rate": 1e-4}}, "['training'] only apply to method: gradual"),
    ({**BASE, "method": "gradual"}, "method: gradual needs a `training` section"),
    ({**BASE, "hub": {"push": True}}, "hub: push: true needs repo_id"),
    ({**BASE, "data": {"loader": "imdb"}}, "loader='imdb'; use one of ('movie_reviews', 'files', 'none')"),
    ({**BASE, "finetune": {}}, "finetune: give exactly one of `teacher`"),
    ({**BASE, "finetune": {"teacher": "bert"}}, "teacher='bert'; built-in teachers: ('movie_review',)"),
    ({**BASE, "method": "gradual", "training": {"output_dir": "x"}}, "training.output_dir: set output.dir instead"),
    ({"pruning": {"macs_ratio": 0.5}}, "a recipe needs a `name`"),
    ({"name": "t"}, "a recipe needs a `pruning` section"),
    ({**BASE, "data": "movie_reviews"}, "data: expected a mapping of keys, got 'movie_reviews'"),
    ({**BASE, "evaluation": {"metrics": ["f1"], "f1_average": "macr"}}, "f1_average='macr'; choose one of"),
    ({**BASE, "evaluation": {"f1_average": "macro"}}, "f1_average='macro' but metrics=['accuracy'] has no f1"),
    ({**BASE, "data": {"loader": "none"}, "finetune": {"training": {}}}, "data.loader is 'none'"),
])
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert message in str(err.value)


def test_training_section_checks_trainingarguments_fields():
    recipe = load_recipe({**BASE, "method": "gradual", "training": {
        "learning_rate": "1e-4",  # YAML 1.1 reads 1e-4 as a string; only a number fits the field
        "num_train_epochs": 2, "eval_strategy": "steps", "report_to": [], "lr_scheduler_type": "cosine"}})
    assert recipe.training["learning_rate"] == 1e-4
    with pytest.raises(RecipeError, match="training.eval_strategy: expected"):
        load_recipe({**BASE, "method": "gradual", "training": {"eval_strategy": 3}})


def test_sections_build_their_dataclasses():
    from hfprune.distill import DistillationConfig
    from hfprune.pruning.schedule import ScheduleConfig

    recipe = load_recipe({**BASE, "method": "gradual", "training": {}, "schedule": {"kind": "iterative", "rounds": 2},
                          "distillation": {"alpha": 0.7}})
    assert isinstance(recipe.schedule, ScheduleConfig) and recipe.schedule.rounds == 2
    assert isinstance(recipe.distillation, DistillationConfig) and recipe.distillation.alpha == 0.7
    with pytest.raises(RecipeError, match="schedule: kind='cubic' is not a schedule"):
        load_recipe({**BASE, "method": "gradual", "training": {}, "schedule": {"kind": "cubic"}})


def test_overrides():
    assert parse_overrides(["--a.b=0.5", "--c", "true", "--d=[1, 2]", "--e=null", "--f=text"]) == [
        ("a.b", 0.5), ("c", True), ("d", [1, 2]), ("e", None), ("f", "text")]
    recipe = load_recipe(BASE, ["--pruning.macs_ratio=0.3", "--hub.repo_id=me/x", "--hub.push=true",
                                "--evaluation.metrics=[accuracy]", "--output.dir", "/tmp/o"])
    assert recipe.pruning.macs_ratio == 0.3 and recipe.hub.push and recipe.hub.repo_id == "me/x"
    assert recipe.evaluation.metrics == ["accuracy"] and str(recipe.output_dir) == "/tmp/o"
    assert recipe.raw["pruning"]["macs_ratio"] == 0.3 and "macs_ratio: 0.3" in recipe.to_yaml()


@pytest.mark.parametrize("args, message", [
    (["pruning.macs_ratio=0.3"], "expected --section.key=value"),
    (["--pruning.macs_ratio"], "has no value"),
    (["--pruning..x=1"], "malformed"),
    (["--name.x=1"], "name is 't', not a section"),
    (["--pruning.macs_ratio=0.3", "--pruning.params_ratio=0.5"], "give exactly one budget"),
])
def test_bad_overrides(args, message):
    with pytest.raises(RecipeError, match=message.replace("(", "\\(").replace(")", "\\)").replace(".", "\\.")):
        load_recipe(BASE, args)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections, got list"):
        load_recipe(tmp_path / "list.yaml")

"""Paths in a recipe file are relative to its folder (``model.path``, ``data.files``), a ``package.module:function``
next to it imports without ``PYTHONPATH``; overrides, dict recipes and ``output.dir`` stay relative to the current
directory. No model is built here: the checks read files and import small modules."""

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from hfprune.pipeline import run
from hfprune.pipeline.recipe import load_recipe

PRUNING = {"criterion": "magnitude", "macs_ratio": 0.5}


def write(folder: Path, raw: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / name


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The current directory: a folder that is not the recipe's."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "cwd"


@pytest.fixture
def module_name():
    """A module a test writes and imports; forgotten afterwards (sys.modules keeps it)."""
    yield "recipe_paths_helpers"
    sys.modules.pop("recipe_paths_helpers", None)


FILES_RECIPE = {"name": "paths", "model": {"path": "models/m"}, "pruning": PRUNING,
                "data": {"loader": "files", "format": "csv",
                         "files": {"train": "data/train.csv", "test": ["data/test.csv", "/abs/more.csv"]}}}


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, elsewhere):
    folder = tmp_path / "project" / "recipes"
    recipe = load_recipe(write(folder, FILES_RECIPE))
    assert recipe.root == folder
    assert recipe.model.path == str(folder / "models/m")
    assert recipe.data.files == {"train": str(folder / "data/train.csv"),
                                 "test": [str(folder / "data/test.csv"), "/abs/more.csv"]}
    assert recipe.raw["data"]["files"]["train"] == "data/train.csv"  # recipe.yaml keeps them as written
    assert "path: models/m" in recipe.to_yaml()
    assert recipe.output_dir == Path("outputs/paths")  # outputs go where the run starts, as before


def test_assets_and_callables_are_not_paths(tmp_path, elsewhere):
    for path in ("asset:minilm", "hfprune.data.timeseries:vic_elec_teacher"):
        recipe = load_recipe(write(tmp_path / "r", {**FILES_RECIPE, "model": {"path": path}}))
        assert recipe.model.path == path


def test_overrides_and_dict_recipes_stay_relative_to_the_current_directory(tmp_path, elsewhere):
    path = write(tmp_path / "r", FILES_RECIPE)
    recipe = load_recipe(path, ["--data.files.train=mine.csv", "--model.path=here/m"])
    assert recipe.data.files["train"] == "mine.csv" and recipe.model.path == "here/m"  # typed in this directory
    assert recipe.data.files["test"][0] == str(tmp_path / "r" / "data/test.csv")  # still the file's
    recipe = load_recipe(FILES_RECIPE)
    assert recipe.root is None and recipe.model.path == "models/m" and recipe.data.files["train"] == "data/train.csv"


def test_a_loader_next_to_the_recipe_imports_without_pythonpath(tmp_path, elsewhere, module_name):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{module_name}.py").write_text(
        "import datasets\n\n\n"
        "def rows(seed=0, n=3):\n"
        "    part = datasets.Dataset.from_dict({'text': ['a b'] * n, 'label': [seed % 2] * n})\n"
        "    return datasets.DatasetDict({'train': part, 'test': part})\n\n\n"
        "def model_dir():\n"
        "    return 'from-the-function'\n")
    path = write(folder, {"name": "loader", "pruning": PRUNING, "data": {"loader": f"{module_name}:rows",
                                                                         "kwargs": {"n": 5}, "seed": 1}})
    before = list(sys.path)
    assert str(folder) not in sys.path and os.getcwd() != str(folder)
    recipe = load_recipe(path)
    raw = run.read_data(recipe.data, recipe.root)
    assert raw["train"]["label"] == [1] * 5
    assert sys.path == before  # the folder was on the path for that import only
    assert run.import_object(f"{module_name}:model_dir", recipe.root)() == "from-the-function"
    assert sys.path == before


def test_a_module_nowhere_on_the_path_is_named(tmp_path, elsewhere, module_name):
    recipe = load_recipe({"name": "x", "pruning": PRUNING, "data": {"loader": f"{module_name}:rows"}})
    with pytest.raises(ValueError, match=f"cannot import '{module_name}:rows': No module named '{module_name}'"):
        run.read_data(recipe.data, recipe.root)
    recipe = load_recipe(write(tmp_path / "p", {**recipe.raw}))
    with pytest.raises(ValueError, match=re.escape(f"looked in the recipe's folder {tmp_path / 'p'} and on sys.path")):
        run.read_data(recipe.data, recipe.root)


def test_missing_paths_name_where_they_were_looked_for(tmp_path, elsewhere):
    folder = tmp_path / "project"
    raw = {**FILES_RECIPE, "data": {**FILES_RECIPE["data"], "files": {"train": "data/train.csv",
                                                                      "test": "data/*.tsv"}}}
    recipe = load_recipe(write(folder, raw))
    where = re.escape(f"(a relative path in a recipe file is relative to its folder, {folder})")
    with pytest.raises(ValueError, match=r"data.files\['train'\]: '.*data/train.csv' is not a file " + where):
        run.resolve_model_path(recipe)  # the run's first step: named before any model loads
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text("text,label\na,1\n")
    with pytest.raises(ValueError, match=r"data.files\['test'\]: '.*data/\*.tsv' matches no file " + where):
        run.read_data(recipe.data, recipe.root)
    (folder / "data" / "test.tsv").write_text("text\tlabel\na\t1\n")
    with pytest.raises(ValueError, match=r"model.path='.*models/m' is not a directory .*" + where):
        run.resolve_model_path(recipe)


def test_a_relative_csv_recipe_loads_its_data_from_any_directory(tmp_path, elsewhere):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        (folder / "data" / f"{split}.csv").write_text(f"text,label\n{split} row,1\nother,0\n")
    raw = {**FILES_RECIPE, "data": {**FILES_RECIPE["data"], "files": {"train": "data/train.csv",
                                                                      "test": "data/*.csv"}}}
    recipe = load_recipe(write(folder, raw))
    data = run.read_data(recipe.data, recipe.root)
    assert data["train"]["text"] == ["train row", "other"] and len(data["test"]) == 4  # the glob: both files


# ---- paths in the loader's keyword arguments (data.kwargs) -----------------------------------------------------------


def test_loader_kwargs_that_name_files_resolve_against_the_recipe_folder(tmp_path, elsewhere):
    folder = tmp_path / "project"
    (folder / "mydata").mkdir(parents=True)
    kwargs = {"files": "data/rows.csv", "data_files": {"train": ["a/*.csv", "/abs/b.csv"]}, "data_dir": "raw",
              "labels_file": "labels.txt", "cache_dir": "~/cache", "time_column": "time", "sep": ";",
              "split": "train", "fractions": {"train": 0.8, "test": 0.2}}
    recipe = load_recipe(write(folder, {"name": "kw", "pruning": PRUNING,
                                        "data": {"loader": "hfprune.data.rows:load_rows", "kwargs": kwargs}}))
    assert recipe.data.kwargs == {
        **kwargs, "files": str(folder / "data/rows.csv"), "data_dir": str(folder / "raw"),
        "data_files": {"train": [str(folder / "a/*.csv"), "/abs/b.csv"]}, "labels_file": str(folder / "labels.txt"),
        "cache_dir": os.path.expanduser("~/cache")}  # other keys as written
    assert recipe.raw["data"]["kwargs"]["files"] == "data/rows.csv"  # recipe.yaml keeps them as written
    # `dataset` is a folder beside the recipe when there is one, else a datasets name
    for name, expected in (("mydata", str(folder / "mydata")), ("imdb", "imdb"), ("user/set", "user/set")):
        recipe = load_recipe(write(folder, {"name": "ds", "pruning": PRUNING, "data": {
            "loader": "hfprune.data.rows:load_rows", "kwargs": {"dataset": name}}}))
        assert recipe.data.kwargs["dataset"] == expected


def test_loader_kwargs_given_as_overrides_or_in_a_dict_stay_relative_to_the_current_directory(tmp_path, elsewhere):
    raw = {"name": "kw", "pruning": PRUNING,
           "data": {"loader": "hfprune.data.rows:load_rows", "kwargs": {"files": "rows.csv", "data_dir": "d"}}}
    recipe = load_recipe(write(tmp_path / "r", raw), ["--data.kwargs.files=mine.csv"])
    assert recipe.data.kwargs == {"files": "mine.csv", "data_dir": str(tmp_path / "r" / "d")}
    assert load_recipe(raw).data.kwargs == {"files": "rows.csv", "data_dir": "d"}


def test_a_rows_recipe_reads_its_csv_from_any_directory(tmp_path, elsewhere, module_name):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "reviews.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(10)))
    recipe = load_recipe(write(folder, {"name": "rows", "pruning": PRUNING, "data": {
        "loader": "hfprune.data.rows:load_rows", "kwargs": {"files": "data/reviews.csv"}}}))
    data = run.read_data(recipe.data, recipe.root)
    assert sum(split.num_rows for split in data.values()) == 10
    # and a loader of one's own beside the recipe, with a path argument of its own naming
    (folder / f"{module_name}.py").write_text(
        "import datasets\n\n\n"
        "def rows(seed=0, csv_path=None):\n"
        "    part = datasets.load_dataset('csv', data_files=csv_path)['train']\n"
        "    return datasets.DatasetDict({'train': part, 'test': part})\n")
    recipe = load_recipe(write(folder, {"name": "own", "pruning": PRUNING, "data": {
        "loader": f"{module_name}:rows", "kwargs": {"csv_path": "data/reviews.csv"}}}))
    assert run.read_data(recipe.data, recipe.root)["train"].num_rows == 10


def test_the_docstring_example_holds():
    import doctest

    from hfprune.pipeline import recipe_paths

    text = "\n".join(line for line in recipe_paths.__doc__.splitlines() if not line.strip().startswith("```"))
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "recipe_paths", recipe_paths.__file__, 0))
    assert runner.failures == 0 and runner.tries > 0

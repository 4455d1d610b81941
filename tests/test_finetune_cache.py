"""The fine-tune stage's cache (``run.finetune``): keyed by the training data's contents, the base model's files and
the training settings, never by the recipe's name or a path. ``Trainer.train`` is counted, not run: what is cached
is the model as the stage leaves it, so an untrained save still tells reuse from retraining."""

import json
import shutil
import sys

import pytest
import torch
import transformers as T
import yaml

from hfprune.pipeline import run
from hfprune.pipeline.recipe import load_recipe

from .test_cli import make_csv, make_tiny_model


@pytest.fixture
def trains(monkeypatch, tmp_path):
    """The rows of each ``Trainer.train`` call's training set; the cache in ``tmp_path/cache``."""
    calls = []
    monkeypatch.setattr(T.Trainer, "train", lambda self, *a, **k: calls.append(list(self.train_dataset["labels"])))
    monkeypatch.setenv("HFPRUNE_CACHE", str(tmp_path / "cache"))
    return calls


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model and CSV files, copied into each test's folder (the model is built once)."""
    root = tmp_path_factory.mktemp("finetune-project")
    make_tiny_model(root)
    make_csv(root)
    return root


def write_recipe(folder, name="ft", loader=None, **training) -> object:
    """A recipe file in ``folder`` whose paths are relative to it (``model``, ``train.csv``, ``test.csv``)."""
    data = loader or {"loader": "files", "format": "csv", "files": {"train": "train.csv", "test": "test.csv"}}
    raw = {"name": name, "model": {"path": "model", "task": "text-classification"},
           "data": {"max_length": 16, **data}, "finetune": {"training": {"max_steps": 1, **training}},
           "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_recipe(path)


@pytest.fixture
def folder(project, tmp_path):
    shutil.copytree(project, tmp_path / "project")
    return tmp_path / "project"


def flip_labels(csv_path) -> None:
    lines = csv_path.read_text().splitlines()
    flipped = [f"{line[:-1]}{1 - int(line[-1])}" for line in lines[1:]]
    csv_path.write_text("\n".join([lines[0], *flipped]) + "\n")


def test_changed_training_labels_retrain(folder, trains):
    first = run.resolve_model_path(write_recipe(folder))
    assert len(trains) == 1 and (first / "finetune.json").is_file()
    assert run.resolve_model_path(write_recipe(folder)) == first and len(trains) == 1  # reused
    flip_labels(folder / "train.csv")
    second = run.resolve_model_path(write_recipe(folder))
    assert second != first and len(trains) == 2
    assert trains[1] == [1 - label for label in trains[0]]  # it trained on the changed labels
    key = json.loads((second / "finetune.json").read_text())
    assert key["data"]["train"] == run.train_data_digest(write_recipe(folder))


def test_same_stage_under_another_name_or_path_reuses(folder, trains):
    first = run.resolve_model_path(write_recipe(folder, name="first"))
    assert run.resolve_model_path(write_recipe(folder, name="renamed")) == first
    # the same bytes elsewhere, and a changed test split (fine-tuning reads the train split only): still reused
    (folder / "copies").mkdir()
    shutil.copy(folder / "train.csv", folder / "copies" / "train.csv")
    flip_labels(folder / "test.csv")
    moved = {"loader": "files", "format": "csv", "files": {"train": "copies/train.csv", "test": "test.csv"}}
    assert run.resolve_model_path(write_recipe(folder, name="moved", loader=moved)) == first
    assert len(trains) == 1
    assert first.parent.name == "finetuned" and len(first.name) == 16  # the key alone: no recipe name in it


def test_model_files_and_training_settings_are_in_the_key(folder, trains):
    first = run.resolve_model_path(write_recipe(folder))
    other = run.resolve_model_path(write_recipe(folder, learning_rate=1e-3))
    assert other != first and len(trains) == 2
    shorter = {"loader": "files", "format": "csv", "files": {"train": "train.csv", "test": "test.csv"}, "max_length": 8}
    assert run.resolve_model_path(write_recipe(folder, loader=shorter)) not in (first, other)  # tokenised anew
    assert run.resolve_model_path(write_recipe(folder, loader={**shorter, "max_length": 16})) == first
    assert len(trains) == 3
    config = T.AutoConfig.from_pretrained(folder / "model")
    torch.manual_seed(1)  # make_tiny_model drew its weights with seed 0
    T.BertForSequenceClassification(config).save_pretrained(folder / "model")
    assert run.resolve_model_path(write_recipe(folder)) not in (first, other) and len(trains) == 4


@pytest.fixture
def fresh_module():
    """The name of a loader module a test writes; forgotten afterwards (sys.modules keeps imported modules)."""
    yield "ft_rows_loader"
    sys.modules.pop("ft_rows_loader", None)


def test_a_loader_is_keyed_by_its_datasets_fingerprint(folder, trains, fresh_module):
    """A ``package.module:function`` loader (here next to the recipe, imported from there): its train split's
    fingerprint follows the rows, not the loader's arguments."""
    (folder / f"{fresh_module}.py").write_text(
        "import datasets\n\n\n"
        "def load(seed=0, flip=False, test_rows=4):\n"
        "    rows = {'text': ['good w1 w2', 'bad w3 w4'] * 4, 'label': [1 - int(flip), int(flip)] * 4}\n"
        "    test = {'text': ['good w5'] * test_rows, 'label': [1] * test_rows}\n"
        "    return datasets.DatasetDict({'train': datasets.Dataset.from_dict(rows),\n"
        "                                 'test': datasets.Dataset.from_dict(test)})\n")
    loader = {"loader": f"{fresh_module}:load"}
    first = run.resolve_model_path(write_recipe(folder, loader=loader))
    same_rows = {**loader, "kwargs": {"test_rows": 2}}  # other arguments, the same training rows
    assert run.resolve_model_path(write_recipe(folder, loader=same_rows)) == first and len(trains) == 1
    flipped = {**loader, "kwargs": {"flip": True}}
    assert run.resolve_model_path(write_recipe(folder, loader=flipped)) != first and len(trains) == 2


def test_a_missing_training_file_is_named_before_anything_is_written(folder, trains, tmp_path):
    recipe = write_recipe(folder)
    (folder / "train.csv").unlink()
    with pytest.raises(ValueError, match=r"data.files\['train'\]: '.*train.csv' is not a file \(a relative path in a "
                                         r"recipe file is relative to its folder"):
        run.resolve_model_path(recipe)
    assert not trains and not (tmp_path / "cache").exists()


def test_model_digest_reads_contents_not_names_of_the_folder(folder):
    before = run.model_digest(folder / "model")
    shutil.copytree(folder / "model", folder / "elsewhere")
    (folder / "elsewhere" / "README.md").write_text("notes\n")  # a card does not change the model
    assert run.model_digest(folder / "elsewhere") == before
    config = json.loads((folder / "model" / "config.json").read_text())
    (folder / "model" / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0}))
    assert run.model_digest(folder / "model") != before


def test_a_cache_folder_hfprune_did_not_write_is_refused_not_replaced(folder, trains):
    first = run.resolve_model_path(write_recipe(folder))
    shutil.rmtree(first)  # the key's folder now holds something else: a user's file, no finetune.json
    first.mkdir()
    (first / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an hfprune fine-tune"):
        run.resolve_model_path(write_recipe(folder))
    assert len(trains) == 1 and (first / "notes.txt").read_text() == "mine"  # refused before training, kept

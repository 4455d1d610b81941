"""transformers habits work on pruned models.

``pipeline(task, model=...)`` takes a pruned model without "is not supported" (the class a checkpoint's own code
defines, the one ``hfprune.from_pretrained`` builds, and a model pruned in memory) and gives the model's outputs.
``save_pretrained(..., push_to_hub=True)`` and ``trainer.push_to_hub()`` upload checkpoints that reload, and a
checkpoint reloaded with its own code keeps ``prune_plan.json`` when it is saved or pushed again. The Hub is
tests/hub_server.py on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
import transformers as T
from huggingface_hub.errors import HfHubHTTPError

import hfprune
from hfprune.core.checkpoint.classes import HfprunedModel
from hfprune.core.checkpoint.save import CODE_FILES, MODELING_FILE, PLAN_FILE

from .hub_server import serving
from .test_cli import make_tiny_model

# the tiny BERT of tests/test_cli.py: 2 layers, 4 heads, 37 neurons
HETERO = {"layers": [{"heads": [0, 1], "ffn": list(range(20))}, {"heads": [3], "ffn": [1, 2, 5, 30]}]}
UNIFORM = {"layers": [{"ffn": list(range(19))}, {"ffn": list(range(10, 29))}]}
TEXTS = ["good w1 w2", "bad w3", "w4 w5 good bad w6 w7"]
CHECKPOINT = {"config.json", "model.safetensors", PLAN_FILE, *CODE_FILES}
NOT_SUPPORTED = "is not supported for"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with serving(monkeypatch, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with the tiny BERT classifier and its word-level tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _pruned(tiny, plan=HETERO):
    dense = T.BertForSequenceClassification.from_pretrained(tiny).eval()
    dense.config._name_or_path = "org/tiny-bert"  # as loading by the Hub id org/tiny-bert sets it: the base_model
    return hfprune.apply_plan(dense, plan).eval()


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def transformers_warnings():
    """Messages transformers logs at WARNING or above (its loggers do not propagate, so caplog misses them)."""
    handler, root, verbosity = _Records(), T.logging.get_logger(), T.logging.get_verbosity()
    T.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        T.logging.set_verbosity(verbosity)


def _assert_pipeline_gives(pipe, model, tokenizer):
    """The pipeline's raw scores are ``model``'s logits, text by text."""
    expected = _logits(model, tokenizer)
    results = pipe(TEXTS, top_k=None, function_to_apply="none")
    for row, scores in zip(expected, results):
        got = {s["label"]: s["score"] for s in scores}
        assert got.keys() == set(model.config.id2label.values())
        for i, label in model.config.id2label.items():
            assert abs(got[label] - row[int(i)].item()) <= 1e-5, (label, got[label], row)


# -- pipeline() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["in memory", "hfprune.from_pretrained", "remote code"])
def test_pipeline_takes_pruned_models_without_warning(tiny, tmp_path, source):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    model = _pruned(tiny)
    folder = tmp_path / f"pipeline-{source.replace(' ', '-').replace('.', '-')}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with transformers_warnings() as warnings:
        if source == "in memory":
            pipe = T.pipeline("text-classification", model=model, tokenizer=tokenizer)
            assert isinstance(pipe.model, HfprunedModel)
        elif source == "hfprune.from_pretrained":
            pipe = T.pipeline("text-classification", model=hfprune.from_pretrained(folder), tokenizer=tokenizer)
            assert isinstance(pipe.model, HfprunedModel)
        else:
            pipe = T.pipeline("text-classification", model=str(folder), trust_remote_code=True)
            assert type(pipe.model).__module__.startswith("transformers_modules.")  # the checkpoint's own class
        _assert_pipeline_gives(pipe, model, tokenizer)
    assert type(pipe.model).__name__ == "BertForSequenceClassification"
    assert isinstance(pipe.model, T.BertForSequenceClassification)
    assert not [m for m in warnings if NOT_SUPPORTED in m], warnings


def test_the_warning_is_seen_when_the_name_is_unknown(tiny):
    # the check above would pass vacuously if the capture missed the message: an unknown class name logs it
    renamed = type("PrunedBertForSequenceClassification", (T.BertForSequenceClassification,), {})
    model = renamed.from_pretrained(tiny).eval()
    with transformers_warnings() as warnings:
        T.pipeline("text-classification", model=model, tokenizer=T.AutoTokenizer.from_pretrained(tiny))
    assert [m for m in warnings if "'PrunedBertForSequenceClassification' " + NOT_SUPPORTED in m], warnings


# -- save_pretrained(push_to_hub=True) -------------------------------------------------------------


def test_save_pretrained_pushes_the_files_it_wrote(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    model = _pruned(tiny)
    folder = tmp_path / "tiny-pruned"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, push_to_hub=True, private=True, commit_message="prune it")

    repo = hub.repos["tester/tiny-pruned"]  # repo_id defaults to the folder's name, as in transformers
    tree = repo.tree()
    assert set(tree) == CHECKPOINT | {"README.md"}  # what this save wrote, and a card: not the tokenizer, nor notes
    assert all(tree[name] == (folder / name).read_bytes() for name in CHECKPOINT)
    assert (folder / "README.md").read_text() == "my notes\n"  # the folder's own README stays, unread
    assert b"library_name: transformers" in tree["README.md"]
    assert repo.private and repo.messages[repo.branches["main"]] == "prune it"

    remote = T.AutoModelForSequenceClassification.from_pretrained(
        "tester/tiny-pruned", trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert torch.allclose(_logits(remote, tokenizer), _logits(model, tokenizer), atol=1e-6)
    loaded = hfprune.from_pretrained("tester/tiny-pruned", cache_dir=tmp_path / "cache2")
    assert loaded.hfprune_plan == model.hfprune_plan and loaded.hfprune_plan.dense == model.hfprune_plan.dense
    assert loaded.hfprune_plan.base_model == "org/tiny-bert"


def test_push_arguments_are_honoured_and_bad_ones_refused(hub, tiny, tmp_path):
    model = _pruned(tiny)
    model.save_pretrained(tmp_path / "a", push_to_hub=True, repo_id="tester/branches", revision="v1")
    repo = hub.repos["tester/branches"]
    assert set(repo.tree("v1")) == CHECKPOINT | {"README.md"} and repo.tree("main") == {}
    model.save_pretrained(tmp_path / "b", push_to_hub=True, repo_id="tester/branches", create_pr=True,
                          commit_description="a smaller model")
    assert PLAN_FILE in repo.tree("refs/pr/1") and repo.tree("main") == {}

    with pytest.raises(TypeError, match=r"unknown arguments \['privat'\]"):
        model.save_pretrained(tmp_path / "c", push_to_hub=True, privat=True)
    assert not (tmp_path / "c").exists()  # refused before anything is written

    with pytest.raises(HfHubHTTPError):
        model.save_pretrained(tmp_path / "d", push_to_hub=True, token="hf_wrong")
    assert CHECKPOINT <= {p.name for p in (tmp_path / "d").iterdir()}  # the local save stands
    assert "tester/d" not in hub.repos


def test_push_removes_what_the_new_checkpoint_supersedes(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    _pruned(tiny).save_pretrained(tmp_path / "hetero", push_to_hub=True, repo_id="tester/swap", max_shard_size="20KB")
    tree = hub.repos["tester/swap"].tree()
    assert "model.safetensors.index.json" in tree and MODELING_FILE in tree and "model.safetensors" not in tree
    plain = _pruned(tiny, UNIFORM)
    assert not plain.hfprune_heterogeneous
    plain.save_pretrained(tmp_path / "plain", push_to_hub=True, repo_id="tester/swap")
    # shards would leave an index beside the new single file, and the old code beside a plain config
    assert set(hub.repos["tester/swap"].tree()) == {"config.json", "model.safetensors", PLAN_FILE, "README.md"}
    remote = T.AutoModelForSequenceClassification.from_pretrained("tester/swap", cache_dir=tmp_path / "cache")
    assert type(remote) is T.BertForSequenceClassification
    assert torch.allclose(_logits(remote.eval(), tokenizer), _logits(plain, tokenizer), atol=1e-6)


# -- Trainer.push_to_hub ---------------------------------------------------------------------------------------


def test_trainer_push_to_hub_uploads_a_checkpoint_that_reloads(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    model = _pruned(tiny)
    args = T.TrainingArguments(output_dir=str(tmp_path / "out"), hub_model_id="tester/trained", report_to="none",
                               use_cpu=True)
    trainer = T.Trainer(model=model, args=args, processing_class=tokenizer)
    trainer.push_to_hub(commit_message="end of training")
    tree = hub.repos["tester/trained"].tree()
    assert CHECKPOINT | {"tokenizer.json", "README.md"} <= set(tree), sorted(tree)
    assert json.loads(tree[PLAN_FILE]) == json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    remote = T.AutoModelForSequenceClassification.from_pretrained(
        "tester/trained", trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert torch.allclose(_logits(remote, tokenizer), _logits(model, tokenizer), atol=1e-6)
    assert hfprune.from_pretrained("tester/trained", cache_dir=tmp_path / "cache2").hfprune_plan == model.hfprune_plan


# -- a checkpoint reloaded with its own code, saved and pushed again -------------------------------


def test_remote_code_model_keeps_its_plan_when_saved_or_pushed(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    model = _pruned(tiny)
    model.save_pretrained(tmp_path / "resave-source")
    original = json.loads((tmp_path / "resave-source" / PLAN_FILE).read_text())
    assert original["base_model"] == "org/tiny-bert" and original["dense"]
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "resave-source",
                                                                    trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules.") and not isinstance(reloaded, HfprunedModel)

    reloaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / PLAN_FILE).read_text()) == original  # plan, dense, base_model
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]  # a name hfprune's loader resolves
    again = hfprune.from_pretrained(tmp_path / "resaved")
    assert again.hfprune_plan == model.hfprune_plan and again.hfprune_plan.dense == model.hfprune_plan.dense

    reloaded.push_to_hub("tester/again")
    tree = hub.repos["tester/again"].tree()
    assert json.loads(tree[PLAN_FILE]) == original and MODELING_FILE in tree
    loaded = hfprune.from_pretrained("tester/again", cache_dir=tmp_path / "cache")
    assert loaded.hfprune_plan == model.hfprune_plan and loaded.hfprune_plan.base_model == "org/tiny-bert"
    assert torch.allclose(_logits(loaded.eval(), tokenizer), _logits(model, tokenizer), atol=1e-6)

    reloaded.save_pretrained(tmp_path / "third", push_to_hub=True, repo_id="tester/third", private=True,
                             commit_message="again")
    repo = hub.repos["tester/third"]
    assert repo.private and repo.messages[repo.branches["main"]] == "again"
    assert json.loads(repo.tree()[PLAN_FILE]) == original == json.loads((tmp_path / "third" / PLAN_FILE).read_text())

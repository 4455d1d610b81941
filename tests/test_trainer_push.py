"""Trainer pushes of a pruned model carry its plan and modeling code (issue 20).

``Trainer.push_to_hub()`` saves into ``output_dir`` and uploads the folder: the pruned model's own
``save_pretrained`` writes ``prune_plan.json`` and ``modeling_hfprune.py`` there. The pushes made while training
(``push_to_hub=True`` with ``hub_strategy="every_save"``, the default) do not save into ``output_dir``: transformers
copies a fixed list of files (config, weights, their index) from the new ``checkpoint-N`` and uploads the folder,
so the repo gets a config whose ``auto_map`` names code that is not there. :class:`hfprune.PrunedPushCallback`
copies the checkpoint's plan and code along. The Hub is tests/hub_server.py on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import hfprune
from hfprune.core.checkpoint.save import MODELING_FILE, PLAN_FILE

from .hub_server import serving
from .test_cli import make_tiny_model
from .test_hf_habits import TEXTS, _logits, _pruned


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with serving(monkeypatch, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


class Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.rows = [{**tokenizer(t), "labels": i % 2} for i, t in enumerate(TEXTS * 4)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_and_push(model, tokenizer, out, repo_id, callbacks=(), **extra):
    args = T.TrainingArguments(output_dir=str(out), push_to_hub=True, hub_model_id=repo_id, save_strategy="steps",
                               save_steps=2, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                               report_to="none", use_cpu=True, **extra)
    trainer = T.Trainer(model=model, args=args, train_dataset=Rows(tokenizer), processing_class=tokenizer,
                        data_collator=T.DataCollatorWithPadding(tokenizer), callbacks=list(callbacks))
    trainer.train()
    trainer._finish_current_push()  # the pushes while training run in the background
    return trainer


def test_pushes_while_training_lack_the_plan_without_the_callback(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    train_and_push(_pruned(tiny), tokenizer, tmp_path / "out", "tester/bare")
    tree = hub.repos["tester/bare"].tree()
    # transformers' behaviour this callback exists for: if this starts failing, transformers copies them itself
    assert "config.json" in tree and "auto_map" in json.loads(tree["config.json"])
    assert PLAN_FILE not in tree and MODELING_FILE not in tree


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_every_push_while_training_carries_plan_and_code(hub, tiny, tmp_path, strategy):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    model = _pruned(tiny)
    repo_id = f"tester/trained-{strategy}"
    train_and_push(model, tokenizer, tmp_path / "out", repo_id, [hfprune.PrunedPushCallback()],
                   hub_strategy=strategy)
    repo = hub.repos[repo_id]
    pushes = [sha for sha, message in repo.messages.items()
              if message.startswith("Training in progress") and not message.endswith(", checkpoint")]
    assert len(pushes) == 2  # steps 2 and 4 (with "checkpoint", each also uploads the folder to last-checkpoint/)
    if strategy == "checkpoint":
        assert f"last-checkpoint/{PLAN_FILE}" in repo.tree()
    for sha in pushes:
        tree = repo.tree(sha)
        assert {"config.json", "model.safetensors", PLAN_FILE, MODELING_FILE} <= set(tree), sorted(tree)
        plan = json.loads(tree[PLAN_FILE])
        assert plan["base_model"] == "org/tiny-bert" and plan["dense"]  # the provenance
    last = (tmp_path / "out" / "checkpoint-4")
    assert repo.tree()[PLAN_FILE] == (last / PLAN_FILE).read_bytes()
    assert repo.tree()[MODELING_FILE] == (last / MODELING_FILE).read_bytes()

    model.eval()
    remote = T.AutoModelForSequenceClassification.from_pretrained(
        repo_id, trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert torch.allclose(_logits(remote, tokenizer), _logits(model, tokenizer), atol=1e-6)  # the trained weights
    loaded = hfprune.from_pretrained(repo_id, cache_dir=tmp_path / "cache2")
    assert loaded.hfprune_plan == model.hfprune_plan and loaded.hfprune_plan.base_model == "org/tiny-bert"


def test_a_model_loaded_with_its_own_code_pushes_its_plan_while_training(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    _pruned(tiny).save_pretrained(tmp_path / "source")
    original = json.loads((tmp_path / "source" / PLAN_FILE).read_text())
    reloaded = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "source", trust_remote_code=True)
    train_and_push(reloaded, tokenizer, tmp_path / "out", "tester/remote", [hfprune.PrunedPushCallback()])
    tree = hub.repos["tester/remote"].tree()
    assert json.loads(tree[PLAN_FILE]) == original and MODELING_FILE in tree
    loaded = hfprune.from_pretrained("tester/remote", cache_dir=tmp_path / "cache")
    assert loaded.hfprune_plan == hfprune.from_pretrained(tmp_path / "source").hfprune_plan


def test_the_callback_leaves_a_dense_model_alone(hub, tiny, tmp_path):
    tokenizer = T.AutoTokenizer.from_pretrained(tiny)
    dense = T.BertForSequenceClassification.from_pretrained(tiny)
    train_and_push(dense, tokenizer, tmp_path / "out", "tester/dense", [hfprune.PrunedPushCallback()])
    tree = hub.repos["tester/dense"].tree()
    assert "model.safetensors" in tree and PLAN_FILE not in tree and MODELING_FILE not in tree
    assert not (tmp_path / "out" / PLAN_FILE).exists()

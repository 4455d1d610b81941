"""F1 in a run fits the task: binary (class 1) for two labels as before, macro for more, or what
``evaluation.f1_average`` says; the results and the table name the averaging ("test f1 (macro)")."""

import random

import pytest
import torch
import transformers as T

from hfprune import metrics
from hfprune.pipeline import run
from hfprune.pipeline.recipe import load_recipe

from .test_cli import WORDS, make_tiny_model

BASE = {"name": "f1", "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}, "data": {"loader": "none"}}


def tiny_classifier(num_labels: int):
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=32, num_labels=num_labels)
    return T.BertForSequenceClassification(config).eval()


def eval_batches(num_labels: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 50, (16, 8), generator=g),
             "attention_mask": torch.ones(16, 8, dtype=torch.long),
             "labels": torch.randint(0, num_labels, (16,), generator=g)} for _ in range(3)]


def expected(model, batches, average: str) -> float:
    with torch.inference_mode():
        pred = [p for b in batches for p in model(input_ids=b["input_ids"],
                                                  attention_mask=b["attention_mask"]).logits.argmax(-1).tolist()]
    ref = [r for b in batches for r in b["labels"].tolist()]
    return metrics.load("f1").compute(predictions=pred, references=ref, average=average)["f1"]


@pytest.mark.parametrize("num_labels, setting, label, average", [
    (2, None, "f1", "binary"),  # as before: the figures of two-label recipes do not change
    (3, None, "f1 (macro)", "macro"),
    (3, "weighted", "f1 (weighted)", "weighted"),
    (3, "binary", "f1", "binary"),  # asked for: the F1 of class 1
    (2, "micro", "f1 (micro)", "micro"),
])
def test_f1_averages_by_labels_or_as_the_recipe_says(num_labels, setting, label, average):
    evaluation = {"metrics": ["accuracy", "f1"], **({"f1_average": setting} if setting else {})}
    recipe = load_recipe({**BASE, "evaluation": evaluation})
    model, batches = tiny_classifier(num_labels), eval_batches(num_labels)
    out = run.evaluate_model(recipe, model, batches)
    assert set(out) == {"accuracy", label}
    assert out[label] == pytest.approx(expected(model, batches, average))
    if average == "micro":
        assert out[label] == pytest.approx(out["accuracy"])  # single-label data: micro F1 is accuracy


def write_three_class_csv(root) -> dict:
    rng, files = random.Random(0), {}
    for split, n in (("train", 32), ("test", 24)):
        rows = ["text,label"] + [f"{' '.join(rng.sample(WORDS, 5))},{i % 3}" for i in range(n)]
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        files[split] = str(root / f"{split}.csv")
    return files


def test_a_three_class_run_reports_macro_f1_by_name(tmp_path):
    model_dir = make_tiny_model(tmp_path)
    config = T.AutoConfig.from_pretrained(model_dir)
    config.num_labels = 3
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).save_pretrained(model_dir)
    recipe = load_recipe({
        "name": "three", "model": {"path": str(model_dir), "task": "text-classification"},
        "data": {"loader": "files", "format": "csv", "files": write_three_class_csv(tmp_path), "max_length": 16,
                 "validation_split": None, "calibration_samples": 8, "calibration_batch_size": 8},
        "pruning": {"criterion": "magnitude", "macs_ratio": 0.5},
        "evaluation": {"metrics": ["accuracy", "f1"], "latency": False}})
    result = run.run(recipe, save=False)
    assert result.results["eval"]["f1_average"] == "macro"
    assert set(result.results["metrics"]["after"]) == {"accuracy", "f1 (macro)"}
    assert "| test f1 (macro) |" in result.table()

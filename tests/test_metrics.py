"""hfprune's metrics are local evaluate modules: they work offline; a Hub metric name fails offline, clearly."""

import math

import evaluate
import pytest
import torch

from hfprune import metrics


def test_all_local_metrics_load_offline():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest: the tests run offline
    for name in metrics.LOCAL_METRICS:
        module = metrics.load(name)
        assert isinstance(module, evaluate.EvaluationModule) and module.name == name


def test_loadable_by_path_with_plain_evaluate():
    assert evaluate.load(str(metrics.local_path("accuracy"))).compute(predictions=[1, 1], references=[1, 0]) == {
        "accuracy": 0.5}


def test_accuracy():
    m = metrics.load("accuracy")
    assert m.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])["accuracy"] == 0.75
    assert m.compute(predictions=[0, 1], references=[0, 0], normalize=False)["accuracy"] == 1.0
    assert m.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3, 1])["accuracy"] == 0.75


def test_f1_averages():
    m = metrics.load("f1")
    pred, ref = [0, 1, 1, 0, 2], [0, 1, 0, 0, 1]
    binary = m.compute(predictions=pred, references=ref, average="binary")["f1"]
    assert binary == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # class 1 only
    per_class = [2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 1), 0.0]
    assert m.compute(predictions=pred, references=ref, average="macro")["f1"] == pytest.approx(sum(per_class) / 3)
    # three classes and no averaging given: macro, not the F1 of class 1
    assert m.compute(predictions=pred, references=ref)["f1"] == pytest.approx(sum(per_class) / 3)
    assert m.compute(predictions=pred, references=ref, average="micro")["f1"] == pytest.approx(3 / 5)
    weighted = (per_class[0] * 3 + per_class[1] * 2) / 5
    assert m.compute(predictions=pred, references=ref, average="weighted")["f1"] == pytest.approx(weighted)
    with pytest.raises(ValueError, match="average='bogus'"):
        m.compute(predictions=pred, references=ref, average="bogus")


def test_f1_default_stays_binary_for_two_classes():
    m = metrics.load("f1")
    pred, ref = [0, 1, 1, 0], [0, 1, 0, 0]
    assert m.compute(predictions=pred, references=ref)["f1"] == m.compute(
        predictions=pred, references=ref, average="binary")["f1"] == pytest.approx(2 / 3)
    # three classes seen: macro (1 + 0 + 0) / 3, where the F1 of class 1 alone would be 0.0
    assert m.compute(predictions=[0, 0, 2], references=[0, 0, 1])["f1"] == pytest.approx((1 + 0 + 0) / 3)


def test_f1_averages_are_the_recipe_choices():
    from hfprune.pipeline.specs import F1_AVERAGES

    m = metrics.load("f1")
    for average in F1_AVERAGES:  # every value a recipe may set is one the metric computes
        assert 0.0 <= m.compute(predictions=[0, 1, 2], references=[0, 2, 2], average=average)["f1"] <= 1.0


def test_regression_metrics_scalar_and_rows():
    assert metrics.load("mse").compute(predictions=[1.0, 3.0], references=[1.0, 1.0])["mse"] == 2.0
    assert metrics.load("mse").compute(predictions=[[1.0, 3.0]], references=[[1.0, 1.0]], squared=False)["mse"] == (
        pytest.approx(math.sqrt(2.0)))
    assert metrics.load("mae").compute(predictions=[[1.0, 3.0], [0.0, 0.0]], references=[[1.0, 1.0], [1.0, 1.0]])[
        "mae"] == 1.0


def test_mase_against_seasonal_naive():
    m = metrics.load("mase")
    history = [[1.0, 2.0, 1.0, 2.0, 1.0]]
    # period 2: the naive in-sample error is 0 -> infinite scale ratio; period 1: every step moves by 1
    assert m.compute(predictions=[[2.0]], references=[[1.0]], training=history, periodicity=1)["mase"] == 1.0
    assert math.isinf(m.compute(predictions=[[2.0]], references=[[1.0]], training=history, periodicity=2)["mase"])
    two = m.compute(predictions=[[2.0], [4.0]], references=[[1.0], [2.0]], training=[[0.0, 1.0], [0.0, 2.0]])
    assert two["mase"] == pytest.approx((1 / 1 + 2 / 2) / 2)  # averaged over series
    with pytest.raises(ValueError, match="too short for periodicity 3"):
        m.compute(predictions=[[1.0]], references=[[1.0]], training=[[1.0, 2.0]], periodicity=3)


def test_perplexity_is_token_weighted_and_matches_the_model_loss():
    m = metrics.load("perplexity")
    out = m.compute(losses=[1.0, 4.0], num_tokens=[3, 1])
    assert out["loss"] == pytest.approx(1.75) and out["perplexity"] == pytest.approx(math.exp(1.75))
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert m.compute(losses=[float(loss)], num_tokens=[5])["perplexity"] == pytest.approx(math.exp(float(loss)))


def test_hub_metric_offline_fails_clearly():
    with pytest.raises(metrics.MetricUnavailable) as err:
        metrics.load("bleu")
    text = str(err.value)
    assert "'bleu' is not shipped with hfprune and HF_HUB_OFFLINE=1 is set" in text and "'accuracy'" in text


def test_local_path_rejects_unknown():
    with pytest.raises(ValueError, match="no local metric 'rouge'"):
        metrics.local_path("rouge")

"""Distillation: the pure losses against hand computations, and DistillationTrainer's loss, normalisation under
gradient accumulation, teacher handling, projections and checkpoints."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from hfprune import PruningConfig
from hfprune.distill import (
    DistillationConfig,
    DistillationTrainer,
    hidden_mse_loss,
    kl_distill_loss,
    logits_mse_loss,
    prediction_mse_loss,
)
from hfprune.distill.trainer import PROJECTION_FILE
from hfprune.pruning.callback import PruningCallback
from hfprune.pruning.schedule import ScheduleConfig

from .scripts.mp_train import tiny_bert, toy_data


def hand_kl(s, t, temp):
    """T^2 * sum_c p_t log(p_t / p_s), softmax at temperature T, with plain Python floats."""
    def softmax(x):
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]
    ps, pt = softmax(s), softmax(t)
    return temp * temp * sum(b * math.log(b / a) for a, b in zip(ps, pt))


def test_kl_matches_hand_computation_sequence_level():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = sum(hand_kl(s[i].tolist(), t[i].tolist(), 2.0) for i in range(3)) / 3
    assert float(kl_distill_loss(s, t, 2.0)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_distill_loss(s, s, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_kl_masks_padding_and_normalises_by_num_items():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kept = [(0, 0), (0, 1), (0, 2), (1, 0)]
    total = sum(hand_kl(s[b, j].tolist(), t[b, j].tolist(), 1.5) for b, j in kept)
    assert float(kl_distill_loss(s, t, 1.5, mask)) == pytest.approx(total / 4, rel=1e-5)
    assert float(kl_distill_loss(s, t, 1.5, mask, num_items=10)) == pytest.approx(total / 10, rel=1e-5)
    # garbage in padded positions changes nothing
    s2 = s.clone()
    s2[1, 1:] = 1e4
    assert float(kl_distill_loss(s2, t, 1.5, mask)) == pytest.approx(total / 4, rel=1e-5)


def test_mse_losses_match_hand_computation():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert float(prediction_mse_loss(s, t)) == pytest.approx(((1 + 4) / 2 + (9 + 1) / 2) / 2)
    assert float(logits_mse_loss(s, t, num_items=5)) == pytest.approx(((1 + 4) / 2 + (9 + 1) / 2) / 5)


def test_hidden_mse_with_layer_map_projection_and_mask():
    g = torch.Generator().manual_seed(2)
    s_h = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    t_h = [torch.randn(2, 3, 6, generator=g) for _ in range(5)]
    proj = torch.nn.ModuleDict({"1": torch.nn.Linear(4, 6, bias=False), "2": torch.nn.Linear(4, 6, bias=False)})
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = hidden_mse_loss(s_h, t_h, {1: 2, 2: 4}, proj, mask)
    total = 0.0
    for b, j in [(0, 0), (0, 1), (1, 0)]:
        per = [((proj[str(i)](s_h[i][b, j]) - t_h[k][b, j]) ** 2).mean() for i, k in ((1, 2), (2, 4))]
        total += float(sum(per).detach()) / 2
    assert float(got.detach()) == pytest.approx(total / 3, rel=1e-5)
    got.backward()
    assert proj["1"].weight.grad is not None  # the projection learns
    with pytest.raises(ValueError, match="out of range"):
        hidden_mse_loss(s_h, t_h, {3: 0}, None, mask)


def trainer_for(tmp_path, model, teacher=None, cfg=None, extra=None, **kw):
    base = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                max_steps=2, learning_rate=1e-3, seed=0, logging_steps=1, train_sampling_strategy="sequential")
    return DistillationTrainer(model=model, args=TrainingArguments(str(tmp_path / "run"), **{**base, **kw}),
                               teacher=teacher, distill_config=cfg or DistillationConfig(), **(extra or {}))


def stack(rows):
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def test_trainer_loss_equals_hand_computation_with_padding(tmp_path):
    student, teacher = tiny_bert(0, token=True), tiny_bert(1, token=True)
    cfg = DistillationConfig(temperature=2.0, alpha=0.7)
    trainer = trainer_for(tmp_path, student, teacher, cfg)
    inputs = stack(toy_data(3, token=True))
    assert (inputs["attention_mask"] == 0).any()
    student.eval()
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    keep = inputs["attention_mask"].bool()
    kl = sum(hand_kl(a.tolist(), b.tolist(), 2.0) for a, b in zip(s[keep], t[keep])) / int(keep.sum())
    ce = torch.nn.functional.cross_entropy(s[keep], inputs["labels"][keep])
    assert float(loss) == pytest.approx(0.7 * kl + 0.3 * float(ce), rel=1e-5)


def test_gradient_accumulation_sums_to_the_full_batch_loss(tmp_path):
    student, teacher = tiny_bert(0, token=True), tiny_bert(1, token=True)
    trainer = trainer_for(tmp_path, student, teacher, DistillationConfig(alpha=0.6, hidden_weight=0.5))
    rows = toy_data(6, token=True, seed=3)
    micro = [stack(rows[:2]), stack(rows[2:])]  # different sizes and padding: a mean of means would be wrong
    assert float(micro[0]["attention_mask"].float().mean()) != float(micro[1]["attention_mask"].float().mean())
    student.train()
    trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    accumulated = sum(trainer.compute_loss(student, b) for b in micro)
    trainer.get_batch_samples(iter([stack(rows)]), 1, torch.device("cpu"))
    full = trainer.compute_loss(student, stack(rows))
    assert float(accumulated) == pytest.approx(float(full), rel=1e-5)


def test_training_with_accumulation_matches_one_big_batch(tmp_path):
    def run(sub, batch, ga):
        model = tiny_bert(0)
        cb = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.5),
                             ScheduleConfig(kind="gradual", start_step=0, end_step=3, every=1))
        trainer = trainer_for(tmp_path / sub, model, tiny_bert(1), DistillationConfig(alpha=0.5),
                              per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=4,
                              extra={"train_dataset": toy_data(64), "callbacks": [cb]})
        trainer.train()
        return cb.plan.to_dict(), model.state_dict()

    plan_a, weights_a = run("a", 8, 1)
    plan_b, weights_b = run("b", 4, 2)
    assert plan_a == plan_b
    for k in weights_a:
        torch.testing.assert_close(weights_a[k], weights_b[k], rtol=1e-4, atol=1e-5)


def test_self_distillation_uses_a_frozen_copy_of_the_dense_model(tmp_path):
    model = tiny_bert(0)
    cfg = DistillationConfig(alpha=0.5)
    trainer = trainer_for(tmp_path, model, None, cfg, extra={"train_dataset": toy_data(16)})
    teacher = trainer.teacher
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    inputs = stack(toy_data(4))
    model.eval()
    with torch.no_grad():
        task = model(**inputs).loss
    assert float(trainer.compute_loss(model, inputs)) == pytest.approx(0.5 * float(task), rel=1e-5)  # KL is 0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not teacher.training


def test_projection_trains_is_checkpointed_beside_and_never_inside_the_student(tmp_path):
    model, teacher = tiny_bert(0), tiny_bert(1, hidden=48, layers=3)
    cfg = DistillationConfig(alpha=0.5, hidden_weight=1.0)
    trainer = trainer_for(tmp_path, model, teacher, cfg, max_steps=3, save_strategy="steps", save_steps=3,
                          extra={"train_dataset": toy_data(32)})
    assert trainer.layer_map == {1: 2, 2: 3}
    initial = {k: v.clone() for k, v in trainer.projections.state_dict().items()}
    trainer.train()
    groups = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(any(p is q for q in groups) for p in trainer.projections.parameters())
    assert any(not torch.equal(initial[k], v) for k, v in trainer.projections.state_dict().items())
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = load_file(checkpoint / PROJECTION_FILE)
    assert all(torch.equal(saved[k], v) for k, v in trainer.projections.state_dict().items())
    student_keys = load_file(checkpoint / "model.safetensors").keys()
    assert not any(k.startswith(("1.", "2.")) or "proj" in k for k in student_keys)
    assert set(student_keys) <= set(model.state_dict())
    # resuming restores the projection
    again = trainer_for(tmp_path, tiny_bert(0), tiny_bert(1, hidden=48, layers=3), cfg, max_steps=3,
                        extra={"train_dataset": toy_data(32)})
    again._load_from_checkpoint(str(checkpoint))
    assert all(torch.equal(saved[k], v) for k, v in again.projections.state_dict().items())


def test_regression_heads_use_mse_to_the_teacher(tmp_path):
    student, teacher = tiny_bert(0, num_labels=1), tiny_bert(1, num_labels=1)
    trainer = trainer_for(tmp_path, student, teacher, DistillationConfig(alpha=1.0))
    inputs = stack(toy_data(4))
    inputs["labels"] = inputs["labels"].float()
    student.eval()
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert float(trainer.compute_loss(student, inputs)) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-5)


@pytest.mark.parametrize("distribution", ["normal", "student_t"])
def test_forecasting_heads_use_the_forecast_loss_of_their_distribution(tmp_path, distribution):
    # Outputs without logits go to hfprune.forecast; a 2-parameter Normal head is only readable with its kind,
    # which the trainer must take from the config.
    from transformers import TimeSeriesTransformerConfig, TimeSeriesTransformerForPrediction

    from hfprune.forecast import forecast_distill_loss

    def tst(seed):
        torch.manual_seed(seed)
        return TimeSeriesTransformerForPrediction(TimeSeriesTransformerConfig(
            prediction_length=4, context_length=6, lags_sequence=[1, 2], num_time_features=1, d_model=8,
            encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=8, decoder_ffn_dim=8, distribution_output=distribution)).eval()

    student, teacher = tst(0), tst(1)
    g = torch.Generator().manual_seed(0)
    batch = {"past_values": torch.rand(3, 8, generator=g) + 1, "past_observed_mask": torch.ones(3, 8),
             "past_time_features": torch.randn(3, 8, 1, generator=g),
             "future_values": torch.rand(3, 4, generator=g) + 1,
             "future_time_features": torch.randn(3, 4, 1, generator=g)}
    trainer = trainer_for(tmp_path, student, teacher, DistillationConfig(alpha=1.0))
    torch.manual_seed(0)
    got = trainer.compute_loss(student, dict(batch)).detach()
    with torch.no_grad():
        torch.manual_seed(0)
        want = forecast_distill_loss(student(**batch), teacher(**batch), batch, distribution=distribution)
    assert torch.isfinite(got) and float(got) == pytest.approx(float(want), rel=1e-4)


def test_teacher_dtype_option(tmp_path):
    trainer = trainer_for(tmp_path, tiny_bert(0), tiny_bert(1), DistillationConfig(teacher_dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher.parameters())
    model = trainer.model
    assert torch.isfinite(trainer.compute_loss(model, stack(toy_data(4))))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0}, "temperature=0"),
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"hidden_weight": -1}, "hidden_weight=-1"),
    ({"loss": "ce"}, "loss='ce'"),
    ({"teacher_dtype": "int8"}, "teacher_dtype='int8'"),
    ({"layer_map": {"a": 1}}, "layer_map"),
])
def test_bad_configs_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


def test_layer_map_accepts_json_keys():
    assert DistillationConfig(layer_map={"1": "3"}).layer_map == {1: 3}

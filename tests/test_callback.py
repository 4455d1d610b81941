"""PruningCallback in a real (tiny) Trainer run: schedules, masks, compaction, save/reload, resume, logging."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hfprune import PruningConfig
from hfprune.core.cost import estimate
from hfprune.pruning.activation_watch import ActivationWatch
from hfprune.pruning.callback import STATE_FILE, PruningCallback
from hfprune.pruning.schedule import ScheduleConfig

from .scripts.mp_train import tiny_bert, toy_data

BUDGET = 0.5


def args(tmp_path, **kw):
    base = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], use_cpu=True,
                logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, average_tokens_across_devices=False)
    return TrainingArguments(str(tmp_path / "run"), **{**base, **kw})


def train(tmp_path, callback, trainer_cls=Trainer, resume=None, extra_callbacks=(), **kw):
    model = tiny_bert(0)
    dense = estimate(model)
    trainer = trainer_cls(model=model, args=args(tmp_path, **kw), train_dataset=toy_data(64),
                          callbacks=[callback, *extra_callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, dense


def batch(seed=5):
    rows = toy_data(4, seed=seed)
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "attention_mask")}


SCHEDULES = {
    "oneshot": ScheduleConfig(kind="oneshot", start_step=2),
    "iterative": ScheduleConfig(kind="iterative", start_step=0, end_step=4, rounds=2),
    "gradual": ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=1),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_each_schedule_prunes_to_budget_and_saves_a_reloadable_checkpoint(tmp_path, kind):
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET), SCHEDULES[kind])
    trainer, model, dense = train(tmp_path, callback)
    assert callback.events_done == {"oneshot": [2], "iterative": [2, 4], "gradual": [1, 2, 3, 4]}[kind]
    # compacted in place: the Trainer's model is the sliced one, under budget
    assert trainer.model is model
    assert estimate(model).macs <= BUDGET * dense.macs
    assert estimate(model).params < dense.params
    # the layers; the model's plan also records the dense sizes
    assert model.hfprune_plan.stacks() == callback.plan.stacks()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    # the Trainer's log carries the pruning metrics
    logged = [h for h in trainer.state.log_history if "prune/macs_ratio" in h]
    assert logged and logged[-1]["prune/macs_ratio"] <= BUDGET and logged[-1]["prune/fraction"] == 1.0


class Probe(TrainerCallback):
    """Checks, at every step, that masked slices get no gradient and stay zero after the optimizer step."""

    def __init__(self, pruning: PruningCallback):
        self.pruning = pruning
        self.checked_grads = self.checked_values = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param, dim, idx in self.pruning._zero_targets:
            assert param.grad is not None
            assert torch.count_nonzero(param.grad.index_select(dim, idx)) == 0
            self.checked_grads += 1

    def on_step_end(self, args, state, control, **kwargs):
        for param, dim, idx in self.pruning._zero_targets:
            assert torch.count_nonzero(param.detach().index_select(dim, idx)) == 0
            self.checked_values += 1


def test_masked_weights_get_no_gradient_and_stay_zero(tmp_path):
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=3, every=1))
    probe = Probe(callback)
    # weight decay and Adam momentum would move masked weights if nothing held them
    train(tmp_path, callback, extra_callbacks=[probe], weight_decay=0.1)
    assert probe.checked_grads > 0 and probe.checked_values > 0


def test_masked_model_during_training_equals_the_compacted_model(tmp_path):
    seen = {}
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="oneshot", start_step=2))

    class BeforeCompaction(TrainerCallback):  # runs before the pruning callback's on_train_end
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                seen["masked"] = model(**batch()).logits

    model = tiny_bert(0)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=toy_data(64), callbacks=[callback])
    trainer.callback_handler.callbacks.insert(0, BeforeCompaction())
    trainer.train()
    model.eval()
    torch.testing.assert_close(model(**batch()).logits, seen["masked"], rtol=0, atol=1e-5)


def test_resume_mid_schedule_ends_with_the_same_plan(tmp_path):
    def make():
        return PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2))

    full = make()
    train(tmp_path / "a", full, max_steps=8, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "a" / "run" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()
    resumed = make()
    train(tmp_path / "a", resumed, max_steps=8, save_strategy="steps", save_steps=3, resume=str(checkpoint))
    assert resumed.events_done == full.events_done == [2, 4, 6]
    assert resumed.plan.to_dict() == full.plan.to_dict()


def test_resume_without_state_fails_clearly(tmp_path):
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2))
    train(tmp_path, callback, max_steps=4, save_strategy="steps", save_steps=3)
    (tmp_path / "run" / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="pruning state"):
        train(tmp_path, PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                                        ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2)),
              max_steps=4, resume=str(tmp_path / "run" / "checkpoint-3"))


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_other_score_sources(tmp_path, criterion):
    start = 0 if criterion == "magnitude" else 2  # data-free criteria may prune before the first step
    callback = PruningCallback(PruningConfig(criterion=criterion, macs_ratio=BUDGET),
                               ScheduleConfig(kind="iterative", start_step=start, end_step=4, rounds=2))
    _, model, dense = train(tmp_path, callback)
    assert estimate(model).macs <= BUDGET * dense.macs


@pytest.mark.parametrize("positional", [False, True])
def test_activation_scores_from_training_leave_out_padding(positional):
    """The callback's activation buffer is the sum over non-padding tokens of each head's output norm, whether the
    attention mask comes by keyword or by position."""
    model = tiny_bert(0).train()
    callback = PruningCallback(PruningConfig(criterion="activation", macs_ratio=BUDGET),
                               ScheduleConfig(kind="oneshot", start_step=2))
    inputs = batch()
    assert (inputs["attention_mask"] == 0).any()
    seen = []
    out_proj = model.bert.encoder.layer[1].attention.output.dense
    handle = out_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    watch = ActivationWatch(model, callback.criterion).attach()  # what the callback attaches for 'activation'
    if positional:
        model(inputs["input_ids"], inputs["attention_mask"])
    else:
        model(**inputs)
    watch.remove()
    handle.remove()
    tokens = seen[0][inputs["attention_mask"].bool()]  # (non-padding tokens, hidden)
    heads = model.config.num_attention_heads
    expected = tokens.reshape(len(tokens), heads, -1).norm(dim=-1).sum(0)
    torch.testing.assert_close(watch.buffer[("layers", 1, "heads")], expected)
    assert not model._forward_pre_hooks and not model._forward_hooks  # unwatching removes the batch hooks too


def test_calibration_scores_allow_pruning_at_step_zero(tmp_path):
    cal = [{k: torch.stack([torch.as_tensor(r[k]) for r in toy_data(8, seed=9)]) for k in
            ("input_ids", "attention_mask", "labels")}]
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="oneshot", start_step=0), calibration=cal)
    _, model, dense = train(tmp_path, callback, max_steps=2)
    assert callback.events_done == [0]
    assert estimate(model).macs <= BUDGET * dense.macs


def test_gradient_criterion_at_step_zero_without_calibration_is_an_error(tmp_path):
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=BUDGET),
                               ScheduleConfig(kind="oneshot", start_step=0))
    with pytest.raises(ValueError, match="calibration"):
        train(tmp_path, callback, max_steps=2)


def test_mixed_precision_and_gradient_accumulation(tmp_path):
    callback = PruningCallback(PruningConfig(criterion="fisher", head_ratio=0.5, ffn_ratio=0.5),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=2))
    _, model, _ = train(tmp_path, callback, bf16=True, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    for layer in model.bert.encoder.layer:
        assert layer.attention.self.query.out_features == 16  # 2 of 4 heads of 8
        assert layer.intermediate.dense.out_features == 24
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(TypeError, match="PruningConfig"):
        PruningCallback({"macs_ratio": 0.5})
    with pytest.raises(TypeError, match="ScheduleConfig"):
        PruningCallback(PruningConfig(macs_ratio=0.5), schedule="gradual")

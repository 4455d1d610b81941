"""SparsityCallback with the stock Trainer: gradual (cubic) magnitude pruning reaches its sparsity, masked weights
stay exactly zero through AdamW steps with weight decay and gradient accumulation, masks survive a resume, iterative
pruning rewinds the kept weights, movement scores, and config=None keeps the zeros of a one-shot sparsify."""

import pytest
import torch
import transformers as T
from transformers import Trainer, TrainerCallback, TrainingArguments

from hfprune.pruning.schedule import ScheduleConfig
from hfprune.pruning.sparsity import SparsityConfig, sparsify
from hfprune.pruning.sparsity.callback import STATE_FILE, TENSORS_FILE, SparsityCallback
from hfprune.pruning.sparsity.patterns import is_nm
from hfprune.pruning.sparsity.targets import find_targets


def _model(seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return T.LlamaForCausalLM(config)


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (n, 12), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def _args(tmp_path, steps, **kw):
    return TrainingArguments(str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True, logging_steps=100,
                             seed=0, dataloader_num_workers=0, **{"save_strategy": "no", **kw})


class ZeroCheck(TrainerCallback):
    """After every optimizer step (and SparsityCallback's own hook), every masked weight is exactly zero."""

    def __init__(self, sparsity_cb):
        self.cb, self.checked, self.history = sparsity_cb, 0, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        for t in self.cb.targets:
            assert (t.weight()[~self.cb.masks[t.name]] == 0).all(), t.name
        self.checked += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append(self.cb.sparsity)


def test_gradual_magnitude_with_accumulation_keeps_masked_weights_zero(tmp_path):
    model = _model()
    cb = SparsityCallback(SparsityConfig(criterion="magnitude", sparsity=0.8),
                          ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2))
    check = ZeroCheck(cb)
    Trainer(model=model, args=_args(tmp_path, 8, gradient_accumulation_steps=2), train_dataset=_data(),
            callbacks=[cb, check]).train()
    assert check.checked == 8
    assert check.history == sorted(check.history) and check.history[-1] == pytest.approx(0.8, abs=1e-3)
    # the cubic: 1 - (1 - 2/6)^3 of 0.8 after the first update
    assert check.history[1] == pytest.approx(0.8 * (1 - (2 / 3) ** 3), abs=1e-3)
    for t in find_targets(model):
        assert float((t.weight() == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    assert model.hfprune_sparsity.sparsity == pytest.approx(0.8, abs=1e-3)


def test_masks_survive_resume(tmp_path):
    def run(steps, resume=None):
        model = _model()
        cb = SparsityCallback(SparsityConfig(criterion="magnitude", sparsity=0.5),
                              ScheduleConfig(kind="iterative", start_step=0, end_step=4, rounds=2))
        args = _args(tmp_path, steps, save_strategy="steps", save_steps=3)
        Trainer(model=model, args=args, train_dataset=_data(), callbacks=[cb, ZeroCheck(cb)]).train(
            resume_from_checkpoint=resume)
        return model, cb

    full, cb_full = run(6)
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / TENSORS_FILE).is_file() and (ckpt / STATE_FILE).is_file()
    resumed, cb_res = run(6, resume=str(ckpt))
    assert cb_res.events_done == cb_full.events_done == [2, 4]
    for name in cb_full.masks:
        assert torch.equal(cb_full.masks[name], cb_res.masks[name])
    for a, b in zip(find_targets(full), find_targets(resumed)):
        assert torch.equal(a.weight() == 0, b.weight() == 0)
        assert torch.allclose(a.weight(), b.weight(), atol=1e-5)


def test_iterative_rewinds_kept_weights_to_the_early_checkpoint(tmp_path):
    model = _model()
    cb = SparsityCallback(SparsityConfig(criterion="magnitude", sparsity=0.5),
                          ScheduleConfig(kind="iterative", start_step=1, end_step=5, rounds=2), rewind_step=1)
    seen = {}

    class Grab(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (1, 3):
                seen[state.global_step] = {t.name: t.weight().detach().clone() for t in cb.targets}

    Trainer(model=model, args=_args(tmp_path, 5), train_dataset=_data(), callbacks=[cb, Grab()]).train()
    for t in cb.targets:  # right after the round at step 3, the kept weights are step 1's
        kept = seen[3][t.name] != 0
        assert torch.equal(seen[3][t.name][kept], seen[1][t.name][kept])
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3)


def test_movement_and_keeping_oneshot_zeros(tmp_path):
    model = _model()
    cb = SparsityCallback(SparsityConfig(criterion="movement", sparsity=0.5),
                          ScheduleConfig(kind="oneshot", start_step=3))
    Trainer(model=model, args=_args(tmp_path, 4), train_dataset=_data(), callbacks=[cb, ZeroCheck(cb)]).train()
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3) and any(m.abs().sum() > 0 for m in cb.movement.values())

    model = _model(1)
    ids = torch.stack([row["input_ids"] for row in _data()[:8]])
    sparsify(model, [{"input_ids": ids}], SparsityConfig(criterion="wanda", pattern="2:4"))
    keep = SparsityCallback(None)
    Trainer(model=model, args=_args(tmp_path, 3), train_dataset=_data(), callbacks=[keep, ZeroCheck(keep)]).train()
    for t in find_targets(model):
        assert is_nm(t.weight() != 0, 2, 4)


def test_callback_refuses_one_shot_options():
    with pytest.raises(ValueError, match="one-shot"):
        SparsityCallback(SparsityConfig(criterion="sparsegpt"))
    with pytest.raises(ValueError, match="oneshot"):
        SparsityCallback(SparsityConfig(pattern="2:4"), ScheduleConfig(kind="gradual"))
    with pytest.raises(ValueError, match="rewind_step"):
        SparsityCallback(SparsityConfig(), ScheduleConfig(kind="gradual"), rewind_step=3)


def test_gradual_magnitude_with_self_distillation(tmp_path):
    from hfprune.distill import DistillationConfig, DistillationTrainer

    model = _model(2)
    cb = SparsityCallback(SparsityConfig(criterion="magnitude", sparsity=0.7),
                          ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=2))
    trainer = DistillationTrainer(model=model, args=_args(tmp_path, 5), train_dataset=_data(), teacher=None,
                                  distill_config=DistillationConfig(alpha=0.5), callbacks=[cb, ZeroCheck(cb)])
    trainer.train()
    assert cb.sparsity == pytest.approx(0.7, abs=1e-3)
    assert all(float((p == 0).float().mean()) < 0.01 for p in trainer.teacher.parameters() if p.dim() == 2)

"""SparsityCallback with the stock Trainer: gradual (cubic) magnitude pruning reaches its sparsity, masked weights
stay exactly zero through AdamW steps with weight decay and gradient accumulation, masks survive a resume, iterative
pruning rewinds the kept weights, movement scores, and config=None keeps the zeros of a one-shot sparsify. The same
through PruningCallback, alone and with heads and neurons: masks carried through the slicing, save and reload,
resume with rewinding, distillation, load_best_model_at_end, and its argument checks."""

import json
from pathlib import Path

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
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, **{"save_strategy": "no", "logging_steps": 100, **kw})


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


# -- one PruningCallback for heads, neurons and single weights ---------------------------------------------------


def test_pruning_callback_with_a_sparsity_config_is_the_sparsity_callback(tmp_path):
    """PruningCallback(SparsityConfig, schedule) drives the same engine: same masks and weights, bit for bit."""
    from hfprune.pruning.callback import PruningCallback

    def run(make):
        model = _model()
        cb = make(SparsityConfig(criterion="magnitude", sparsity=0.8),
                  ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2))
        engine = cb.sparse if isinstance(cb, PruningCallback) else cb
        check = ZeroCheck(engine)
        trainer = Trainer(model=model, args=_args(tmp_path, 8, gradient_accumulation_steps=2, logging_steps=2),
                          train_dataset=_data(), callbacks=[cb, check])
        trainer.train()
        assert check.checked == 8 and engine.sparsity == pytest.approx(0.8, abs=1e-3)
        return model, trainer

    combined, trainer = run(PruningCallback)
    alone, _ = run(SparsityCallback)
    for (name, a), (_, b) in zip(combined.state_dict().items(), alone.state_dict().items()):
        assert torch.equal(a, b), name
    logged = [h["prune/sparsity"] for h in trainer.state.log_history if "prune/sparsity" in h]
    assert logged and logged == sorted(logged) and logged[-1] == pytest.approx(0.8, abs=1e-3)


class BothCheck(TrainerCallback):
    """After every optimizer step, the weight-masked weights are zero; after every step, the weights of masked heads
    and neurons too (the structure zeroes them at step end, as PruningCallback always has)."""

    def __init__(self, cb):
        self.cb, self.checked = cb, 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        for t in self.cb.sparse.targets:
            assert (t.weight()[~self.cb.sparse.masks[t.name]] == 0).all(), t.name
        self.checked += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.on_optimizer_step(args, state, control)
        for param, dim, idx in self.cb._zero_targets:
            assert torch.count_nonzero(param.detach().index_select(dim, idx)) == 0


def _combined(sparsity=0.5, **kw):
    from hfprune import PruningConfig
    from hfprune.pruning.callback import PruningCallback

    return PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.6),
                           ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=2),
                           sparsity=SparsityConfig(criterion="magnitude", sparsity=sparsity), **kw)


def _batch():
    return torch.stack([row["input_ids"] for row in _data(4)])


def test_heads_neurons_and_weights_together_slice_and_save(tmp_path):
    """Structure and weight masks in one callback: the sparsity is a share of the weights the structure keeps, the
    weight masks are carried onto the sliced weights exactly as apply_plan slices (checked by slicing a copy whose
    weights are the masks), the sliced model computes what the masked one did, and save_sparse writes both."""
    import copy

    import hfprune
    from hfprune.core.checkpoint.sparse import SPARSITY_FILE

    cb = _combined()
    seen = {}

    class BeforeSlicing(TrainerCallback):  # runs before the pruning callback's on_train_end
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                seen["logits"] = model(_batch()).logits
            seen["masks"] = copy.deepcopy(model)
            for t in find_targets(seen["masks"]):
                with torch.no_grad():
                    t.weight().copy_(cb.sparse.masks[t.name].float())

    model = _model()
    check = BothCheck(cb)
    trainer = Trainer(model=model, args=_args(tmp_path, 6, gradient_accumulation_steps=2, logging_steps=2),
                      train_dataset=_data(), callbacks=[cb, check])
    trainer.callback_handler.callbacks.insert(0, BeforeSlicing())
    trainer.train()
    assert check.checked == 12 and cb.events_done == cb.sparse.events_done == [2, 4]
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in cb.plan.to_dict()["layers"])
    # the masks, sliced by apply_plan itself, are the masks the callback carried
    hfprune.apply_plan(seen["masks"], cb.plan)
    targets = find_targets(model)
    assert [t.name for t in targets] == [t.name for t in find_targets(seen["masks"])] == list(cb.sparse.masks)
    for t, m in zip(targets, find_targets(seen["masks"])):
        assert torch.equal(cb.sparse.masks[t.name], m.weight() != 0), t.name
        assert (t.weight()[~cb.sparse.masks[t.name]] == 0).all()
        # the sparsity counts the weights the structure keeps: each sliced weight is at the target
        assert float((t.weight() == 0).float().mean()) == pytest.approx(0.5, abs=0.02), t.name
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_batch()).logits, seen["logits"], rtol=0, atol=1e-5)
    logged = [h for h in trainer.state.log_history if "prune/sparsity" in h]
    assert logged[-1]["prune/sparsity"] == pytest.approx(0.5, abs=0.01) and "prune/macs_ratio" in logged[-1]

    for compact in (False, True):
        out = tmp_path / f"saved-{compact}"
        plan = hfprune.save_sparse(model, out, compact=compact)
        assert (out / SPARSITY_FILE).is_file() and plan.sparsity == pytest.approx(0.5, abs=0.01)
        reloaded = hfprune.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(_batch()).logits, model(_batch()).logits, rtol=0, atol=1e-6)
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "saved-False", trust_remote_code=True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    for t in find_targets(plain):
        assert torch.equal(t.weight() == 0, dict((x.name, x) for x in targets)[t.name].weight() == 0)


def test_combined_callback_resumes_with_rewinding(tmp_path):
    """Heads and neurons on a gradual schedule, weights in iterative rounds rewound to step 1: a run resumed from
    step 3 ends with the plan, the masks and the weights of the uninterrupted run."""

    import shutil

    def run(resume=None, root=tmp_path, load=False):
        cb = _combined(sparsity_schedule=ScheduleConfig(kind="iterative", start_step=1, end_step=5, rounds=2),
                       rewind_step=1)
        if load:  # a checkpoint outside output_dir: its states are named to the callback
            cb.load_state(resume)
        model = _model()
        args = _args(root, 6, save_strategy="steps", save_steps=3)
        Trainer(model=model, args=args, train_dataset=_data(), callbacks=[cb, BothCheck(cb)]).train(
            resume_from_checkpoint=resume)
        return model, cb

    full, cb_full = run()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / TENSORS_FILE).is_file() and (ckpt / "hfprune_pruning_state.json").is_file()
    moved = shutil.copytree(ckpt, tmp_path / "moved")
    resumed, cb_res = run(str(ckpt))
    _, cb_moved = run(str(moved), root=tmp_path / "other", load=True)
    assert cb_moved.plan.to_dict() == cb_full.plan.to_dict() and cb_moved.sparse.events_done == [3, 5]
    assert all(torch.equal(cb_moved.sparse.masks[k], m) for k, m in cb_full.sparse.masks.items())
    assert cb_res.sparse.events_done == cb_full.sparse.events_done == [3, 5]
    assert cb_res.events_done == cb_full.events_done == [2, 4]
    assert cb_res.plan.to_dict() == cb_full.plan.to_dict()
    assert cb_res.sparse.masks.keys() == cb_full.sparse.masks.keys()
    for name in cb_full.sparse.masks:
        assert torch.equal(cb_full.sparse.masks[name], cb_res.sparse.masks[name]), name
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_combined_callback_with_distillation(tmp_path):
    from hfprune.distill import DistillationConfig, DistillationTrainer

    cb = _combined(sparsity=0.6)
    check = BothCheck(cb)
    model = _model(2)
    trainer = DistillationTrainer(model=model, args=_args(tmp_path, 5, gradient_accumulation_steps=2),
                                  train_dataset=_data(), teacher=None, callbacks=[cb, check],
                                  distill_config=DistillationConfig(alpha=0.5, hidden_weight=0.5))
    trainer.train()
    assert check.checked == 10 and cb.sparse.sparsity == pytest.approx(0.6, abs=0.01)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in trainer.teacher.parameters())
    assert all(float((p == 0).float().mean()) < 0.01 for p in trainer.teacher.parameters() if p.dim() == 2)


def test_combined_arguments_are_checked_before_anything_changes(tmp_path):
    from hfprune import PruningConfig
    from hfprune.pruning.callback import PruningCallback

    fisher = PruningConfig(criterion="fisher", macs_ratio=0.6)
    with pytest.raises(TypeError, match="PruningConfig .* or a SparsityConfig"):
        PruningCallback(0.5)
    with pytest.raises(ValueError, match="calibration"):
        PruningCallback(SparsityConfig(), calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="sparsity"):
        PruningCallback(SparsityConfig(), sparsity=SparsityConfig())
    with pytest.raises(ValueError, match="regroups"):
        PruningCallback(fisher, sparsity=SparsityConfig(pattern="2:4"))
    with pytest.raises(TypeError, match="'keep' or None"):
        PruningCallback(fisher, sparsity=0.5)
    with pytest.raises(ValueError, match="rewind_step"):
        PruningCallback(fisher, rewind_step=2)
    with pytest.raises(ValueError, match="rewind_step"):
        PruningCallback(fisher, sparsity="keep", rewind_step=2)
    with pytest.raises(TypeError, match="sparsity_schedule"):
        PruningCallback(fisher, sparsity=SparsityConfig(), sparsity_schedule={"kind": "gradual"})
    # weights pruned to the end before heads and neurons are: refused at train begin, before any change
    cb = _combined(sparsity_schedule=ScheduleConfig(kind="oneshot", start_step=2))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="ends at step 2, before the last pruning of heads and neurons at step 4"):
        Trainer(model=model, args=_args(tmp_path, 4), train_dataset=_data(), callbacks=[cb]).train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("structure", [False, True])
def test_load_best_model_at_end_takes_the_best_checkpoints_masks(tmp_path, structure):
    """The Trainer reloads the best checkpoint's weights before on_train_end: the masks (and the plan of heads and
    neurons) must be that checkpoint's too, not the later ones, or the end would zero weights the best model has."""
    from safetensors.torch import load_file

    import hfprune
    from hfprune.pruning.callback import PruningCallback

    schedule = ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2)
    cb = _combined(0.8, sparsity_schedule=schedule) if structure else \
        PruningCallback(SparsityConfig(criterion="magnitude", sparsity=0.8), schedule)
    model = _model()
    args = _args(tmp_path, 6, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(8), callbacks=[cb])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # an earlier, less sparse checkpoint
    saved = load_file(f"{best}/model.safetensors")
    if structure:  # the best checkpoint's dense, masked weights, sliced to its plan, are the model's
        assert cb.plan.to_dict() == hfprune.PrunePlan.from_dict(
            json.loads((Path(best) / "hfprune_pruning_state.json").read_text())["plan"]).to_dict()
        best_model = _model()
        best_model.load_state_dict(saved)
        hfprune.apply_plan(best_model, cb.plan)
        saved = best_model.state_dict()
        assert model.state_dict().keys() == saved.keys()
    for t in cb.sparse.targets:
        assert torch.equal(t.weight(), saved[t.name]), t.name
        assert torch.equal(cb.sparse.masks[t.name], saved[t.name] != 0), t.name
    assert cb.sparse.sparsity < 0.8 and model.hfprune_sparsity.sparsity == pytest.approx(cb.sparse.sparsity)

"""What criteria declare about themselves (``Importance``'s class attributes) and what reads it: the one
constructor ``PruningConfig.build_importance``, one-shot pruning and ``PruningCallback``. A criterion defined here,
in one class, runs through all of them with no name of it anywhere in hfprune."""

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hfprune
from hfprune import PruningCallback, PruningConfig, ScheduleConfig
from hfprune.core.cost import estimate
from hfprune.pruning.importance import base, get_importance, importance_class
from hfprune.pruning.importance.base import Importance, register_importance

from .scripts.mp_train import tiny_bert, toy_data

# name: (signal, loss_scale, seeded, fisher_blocks, training_signal): what the built-in criteria mean today
BUILT_IN = {
    "activation": ("activations", False, False, False, "activations"),
    "fisher": ("gate_gradients", True, False, True, "gate_gradients"),
    "fluctuation": ("activations", False, False, False, None),
    "frequency": ("activations", False, False, False, None),
    "magnitude": ("weights", False, False, False, None),
    "random": ("weights", False, True, False, None),
    "reap": ("activations", False, False, False, None),
    "taylor": ("gradients", True, False, False, "gate_gradients"),
}


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry: criteria registered in a test go away with it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_built_in_declarations():
    assert set(BUILT_IN) == set(hfprune.supported_importance())
    for name, (signal, loss_scale, seeded, fisher_blocks, training) in BUILT_IN.items():
        cls = importance_class(name)
        assert (cls.signal, cls.loss_scale, cls.seeded, cls.fisher_blocks, cls.training_signal) == \
            (signal, loss_scale, seeded, fisher_blocks, training), name
        assert cls.needs_data == (signal != "weights")


@pytest.mark.parametrize("name", sorted(BUILT_IN))
@pytest.mark.parametrize("recovery", ["auto", "none"])
def test_build_importance_follows_the_declarations(name, recovery):
    config = PruningConfig(criterion=name, macs_ratio=0.5, seed=5, recovery=recovery)
    cls = config.criterion_class
    criterion = config.build_importance()
    assert type(criterion) is cls
    if cls.seeded:
        assert criterion.seed == 5 and config.build_importance(seed=9).seed == 9
    if cls.fisher_blocks:
        assert criterion.keep_blocks == (recovery == "auto")
        assert not config.build_importance(for_recovery=False).keep_blocks
    assert config.resolved_normalize == ("none" if cls.loss_scale else "layer")
    assert config.resolved_recovery == ("rearrange" if cls.fisher_blocks and recovery == "auto" else "none")


class GateL1(Importance):
    """Sum of |dL/dg| over calibration batches (fisher's gradients, not squared); the same per step in training."""

    name = "test_gate_l1"
    signal = "gate_gradients"
    loss_scale = True
    seeded = True
    training_signal = "gate_gradients"
    calls: list = []

    def __init__(self, seed: int = 0):
        self.seed = seed

    def gate_terms(self, grads):
        self.calls.append("gate_terms")
        return grads.abs()

    def score(self, model, batches=None):
        return {k: v.sqrt() for k, v in get_importance("fisher").score(model, batches).items()}


class OutputL1(Importance):
    """Mean |x| of each unit's output-projection inputs; summed per unit in training."""

    name = "test_output_l1"
    training_signal = "activations"
    calls: list = []

    def activation_terms(self, x, units):
        self.calls.append("activation_terms")
        return x.abs().reshape(-1, units, x.shape[-1] // units).sum((0, 2))

    def score(self, model, batches=None):
        return get_importance("activation").score(model, batches)


def _calibration() -> list:
    rows = toy_data(8, seed=9)
    return [{k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "attention_mask", "labels")}]


def _prune_and_train(name: str, tmp_path) -> PruningCallback:
    """Prune a tiny BERT one-shot with criterion ``name`` and train another with it in a PruningCallback (no
    calibration data); both must meet the budget."""
    config = PruningConfig(criterion=name, macs_ratio=0.5, seed=4)
    result = hfprune.prune(tiny_bert(0), _calibration(), config)
    assert result.after.macs <= 0.5 * result.before.macs
    callback = PruningCallback(config, ScheduleConfig(kind="iterative", start_step=2, end_step=4, rounds=2))
    model = tiny_bert(0)
    dense = estimate(model)
    args = TrainingArguments(str(tmp_path), max_steps=5, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=toy_data(64), callbacks=[callback]).train()
    assert estimate(model).macs <= 0.5 * dense.macs
    return callback


@pytest.mark.parametrize("cls", [GateL1, OutputL1])
def test_a_new_criterion_is_one_class_for_prune_and_the_callback(registry, tmp_path, cls):
    register_importance(cls)
    config = PruningConfig(criterion=cls.name, macs_ratio=0.5, seed=4)
    assert config.resolved_normalize == ("none" if cls.loss_scale else "layer")
    if cls.seeded:
        assert config.build_importance().seed == 4
    cls.calls.clear()
    callback = _prune_and_train(cls.name, tmp_path)
    assert callback.source == cls.training_signal and cls.calls  # scored by its training-time form


def test_a_criterion_without_a_training_time_form_needs_calibration_in_the_callback():
    with pytest.raises(ValueError, match="cannot score from training; pass calibration"):
        PruningCallback(PruningConfig(criterion="fluctuation", macs_ratio=0.5))
    callback = PruningCallback(PruningConfig(criterion="fluctuation", macs_ratio=0.5), calibration=_calibration())
    assert callback.source == "calibration"


@pytest.mark.parametrize("attrs,message", [
    ({"signal": "logits"}, "signal='logits'; declare one of"),
    ({"training_signal": "weights"}, "training_signal='weights'; declare one of"),
    ({"training_signal": "gate_gradients"}, "needs the method gate_terms"),
    ({"training_signal": "activations"}, "needs the method activation_terms"),
    ({"seeded": True}, "seeded=True, but __init__ takes no 'seed'"),
    ({"fisher_blocks": True}, "fisher_blocks=True, but __init__ takes no 'keep_blocks'"),
])
def test_declarations_that_do_not_hold_together_are_refused(registry, attrs, message):
    cls = type("Bad", (Importance,), {"name": "test_bad", **attrs})
    with pytest.raises(ValueError, match=message):
        register_importance(cls)
    assert "test_bad" not in hfprune.supported_importance()


def test_needs_data_follows_the_signal():
    class Weights(Importance):
        signal = "weights"

    class Before(Importance):  # declared as criteria were before `signal`
        needs_data = False

    class Data(Importance):
        pass

    assert not Weights.needs_data and not Before.needs_data and Before.signal == "weights"
    assert Data.needs_data and Data.signal == "activations"
    with pytest.raises(TypeError, match="only a 'weights' criterion runs without data"):
        type("Contradiction", (Importance,), {"signal": "gradients", "needs_data": False})


def test_rearrange_needs_a_criterion_that_keeps_fisher_blocks(registry):
    with pytest.raises(ValueError, match="needs criterion='fisher', not 'taylor'"):
        PruningConfig(criterion="taylor", macs_ratio=0.5, recovery="rearrange")

    class Blocks(GateL1):
        name = "test_blocks"
        fisher_blocks = True

        def __init__(self, seed: int = 0, keep_blocks: bool = False):
            super().__init__(seed)
            self.keep_blocks = keep_blocks

    register_importance(Blocks)
    config = PruningConfig(criterion="test_blocks", macs_ratio=0.5)
    assert config.resolved_recovery == "rearrange" and config.build_importance().keep_blocks
    with pytest.raises(ValueError, match="needs criterion='fisher' or 'test_blocks', not 'taylor'"):
        PruningConfig(criterion="taylor", macs_ratio=0.5, recovery="full")


def docs_criterion_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "extending.md").read_text()
    section = text[text.index("## A new importance criterion"):text.index("## A new model family")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_criterion_runs_one_shot_and_in_the_callback(registry, tmp_path, capsys):
    code = docs_criterion_example()
    cls_code = code[code.index("@register_importance"):code.index("torch.manual_seed")]
    assert len([line for line in cls_code.splitlines() if line.strip()]) <= 25, "the example is meant to be short"
    exec(compile(code, "docs/extending.md", "exec"), {})
    assert "MACs" in capsys.readouterr().out
    cls = importance_class("mean_abs_output")
    assert cls.needs_data and cls.training_signal == "activations"
    assert _prune_and_train("mean_abs_output", tmp_path).source == "activations"

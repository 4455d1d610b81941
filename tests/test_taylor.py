"""Taylor's two forms. One-shot scores (sum of |w * dL/dw| over each head's and neuron's weights) against an
independent sum over the weight slices ``Block.unit_slices`` names, in the layout the weights are stored in
(GPT-2's Conv1D is (in, out); its attention output projection is square, so a transposed gradient cannot be caught
by shape); the training-time form (|dL/dgate|) against the signed sum over the output projection's columns."""

from __future__ import annotations

import pytest
import torch

from hfprune.core.apply import unwrap
from hfprune.core.blocks import base_layer, iter_blocks
from hfprune.core.masking import Masks
from hfprune.pruning.importance import get_importance
from hfprune.pruning.importance.base import calibration_loss

from .cases import CASES


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_taylor_scores_sum_w_times_grad_over_each_units_weights(model_type):
    case = CASES[model_type]
    torch.manual_seed(0)
    model = case.build("eager").eval()
    batch = case.inputs(0)
    batch = {**batch, "labels": batch["input_ids"] if model_type == "gpt2" else torch.tensor([0, 2])}
    scores = get_importance("taylor").score(model, [batch])

    model.zero_grad(set_to_none=True)
    calibration_loss(model, batch).backward()
    checked = 0
    for block in iter_blocks(unwrap(model)):
        for unit in range(block.units):
            expected = sum(float((p * p.grad).abs().index_select(dim, idx.to(p.device)).sum())
                           for p, dim, idx in block.unit_slices(torch.tensor([unit])) if p.dim() == 2)
            got = float(scores[block.key][unit])
            assert got == pytest.approx(expected, rel=1e-4), (block.key, unit)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama"])
def test_training_time_taylor_reads_gate_gradients_a_signed_sum_over_output_columns(model_type):
    """PruningCallback's taylor (no calibration data) accumulates ``|dL/dg|`` per step (``gate_terms``); ``dL/dg`` is
    ``sum w * dL/dw`` over the unit's output-projection columns, signed, where one-shot taylor sums ``|w * dL/dw|``
    over all of the unit's weights."""
    case = CASES[model_type]
    torch.manual_seed(0)
    model = case.build("eager").eval()
    batch = case.inputs(0)
    batch = {**batch, "labels": batch["input_ids"] if model_type != "bert" else torch.tensor([0, 2])}
    masks = Masks(model)
    for gate in masks.gates.values():
        gate.requires_grad_(True)
    masks.attach()
    try:
        calibration_loss(model, batch).backward()
    finally:
        masks.remove()
    taylor = get_importance("taylor")
    assert taylor.training_signal == "gate_gradients"
    for block in iter_blocks(model):
        gate_grad = masks.gates[block.key].grad
        torch.testing.assert_close(taylor.gate_terms(gate_grad), gate_grad.abs())
        out = base_layer(block.output_projection()).weight
        for unit in range(block.units):
            ((p, dim, idx),) = [s for s in block.unit_slices(torch.tensor([unit])) if s[0] is out]
            expected = float((p * p.grad).index_select(dim, idx.to(p.device)).sum())
            assert float(gate_grad[unit]) == pytest.approx(expected, rel=1e-4, abs=1e-8), (block.key, unit)

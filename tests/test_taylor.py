"""Taylor scores (sum of |w * dL/dw| over each head's and neuron's weights) against an independent sum over the
weight slices ``Block.unit_slices`` names, in the layout the weights are stored in (GPT-2's Conv1D is (in, out);
its attention output projection is square, so a transposed gradient cannot be caught by shape)."""

from __future__ import annotations

import pytest
import torch

from hfprune.apply import unwrap
from hfprune.blocks import iter_blocks
from hfprune.importance import get_importance
from hfprune.importance.base import calibration_loss

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

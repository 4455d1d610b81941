# Copyright hfprune contributors. Apache-2.0.
"""Taylor: first-order ``sum |w * dL/dw|`` over each head's / neuron's coupled weights, on calibration data."""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import base_layer, is_conv1d, weight_out_in
from .base import (
    Importance,
    calibration_loss,
    iterate,
    reduce_across_processes,
    register_importance,
    require_data,
    to_device,
)
from .magnitude import head_and_neuron_terms


@register_importance
class TaylorImportance(Importance):
    name = "taylor"
    loss_scale = True

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        saved = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        try:
            scores = None
            for batch in iterate(batches, "taylor"):
                model.zero_grad(set_to_none=True)
                calibration_loss(model, to_device(batch, device)).backward()
                with torch.no_grad():
                    part = head_and_neuron_terms(model, _abs_w_grad)
                scores = part if scores is None else {k: scores[k] + part[k] for k in scores}
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(saved[n][0])
                p.grad = saved[n][1]
        if scores is None:
            raise ValueError("the calibration data is empty")
        return reduce_across_processes(scores)


def _abs_w_grad(module) -> torch.Tensor:
    w = weight_out_in(module)
    grad = base_layer(module).weight.grad
    if grad is None:
        return torch.zeros_like(w, dtype=torch.float32)
    # the gradient has the stored layout: Conv1D stores (in, out), and a square one cannot be told apart by shape
    grad = grad.T if is_conv1d(base_layer(module)) else grad
    return (w * grad).float().abs()

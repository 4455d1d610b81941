# Copyright hfprune contributors. Apache-2.0.
"""Taylor: first-order estimates of how much the loss changes when a head or neuron is removed. Two forms:

- One-shot (``hfprune.prune``, and ``PruningCallback`` given calibration data): ``sum |w * dL/dw|`` over each
  unit's coupled weights (its q/k/v rows and output-projection columns; its up/gate rows and down column) on
  calibration data, each weight's own saliency summed (``signal = "gradients"``).
- During training (``PruningCallback`` without calibration data): ``|dL/dg|`` of the unit's gate at each optimizer
  step, summed over the steps between two pruning steps (``training_signal = "gate_gradients"``,
  :meth:`TaylorImportance.gate_terms`). ``dL/dg`` equals ``sum w * dL/dw`` over the unit's output-projection
  columns, signed: the first-order loss change of zeroing the whole unit (Molchanov et al. 2019). It needs only the
  gates' gradients, which the training step computes anyway.

The two are different numbers (the one-shot form counts every coupled weight and its terms cannot cancel), so a
plan from one is not expected to equal a plan from the other.
"""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import base_layer, is_conv1d, weight_out_in
from ...core.calibration import iterate, reduce_across_processes, to_device
from ...core.sharded import is_sharded
from .base import GATE_GRADIENTS, GRADIENTS, Importance, calibration_loss, register_importance, require_data
from .magnitude import head_and_neuron_terms


@register_importance
class TaylorImportance(Importance):
    name = "taylor"
    signal = GRADIENTS
    loss_scale = True
    training_signal = GATE_GRADIENTS

    def gate_terms(self, grads: torch.Tensor) -> torch.Tensor:
        return grads.abs()

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        if is_sharded(model):  # FSDP2 averages parameter gradients over ranks in backward: no per-rank |w * grad|
            raise NotImplementedError("taylor on calibration data needs each rank's own parameter gradients, which a "
                                      "sharded (FSDP2) model does not keep; use taylor or fisher without calibration "
                                      "(gate gradients from training), or fisher with calibration")
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

# Copyright hfprune contributors. Apache-2.0.
"""Fisher: squared gradients of head/neuron gates, accumulated over calibration batches (Kwon et al. 2022).

Per example, ``(dL/dg)^2`` is the diagonal of the empirical Fisher information of the gate at g = 1;
summed over the data it estimates the loss increase of removing that head or neuron.
"""

from __future__ import annotations

import torch

from ..apply import unwrap
from ..masking import Masks
from .base import (
    Importance,
    calibration_loss,
    iterate,
    reduce_across_processes,
    register_importance,
    require_data,
    to_device,
)


@register_importance
class FisherImportance(Importance):
    name = "fisher"

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        masks = Masks(model)
        for gate in masks.gates.values():
            gate.requires_grad_(True)
        scores = {k: torch.zeros_like(g, requires_grad=False) for k, g in masks.gates.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # only the gates need gradients here
            p.requires_grad_(False)
        masks.attach()
        seen = 0
        try:
            for batch in iterate(batches, "fisher"):
                batch = to_device(batch, device)
                # per-example gradients: the Fisher is a sum of squares over examples, not of batch sums
                size = _batch_size(batch)
                for j in range(size):
                    one = {k: v[j : j + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v
                           for k, v in batch.items()}
                    grads = torch.autograd.grad(calibration_loss(model, one), list(masks.gates.values()),
                                                allow_unused=True)
                    for key, grad in zip(masks.gates, grads):
                        if grad is not None:
                            scores[key] += grad.detach().float().pow(2)
                    seen += 1
        finally:
            masks.remove()
            for p in params:
                p.requires_grad_(True)
        if seen == 0:
            raise ValueError("the calibration data is empty")
        return reduce_across_processes(scores)


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("a calibration batch needs at least one tensor with a batch dimension")

# Copyright hfprune contributors. Apache-2.0.
"""Routing frequency: how often each routed expert of a mixture-of-experts layer is among a token's top-k on
calibration data (the share of non-padding tokens routed to it). Scores only the ``experts`` blocks; heads and
neurons are left whole, so it is used with ``expert_ratio`` (or a budget over the experts alone).
"""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import iter_blocks
from ...core.calibration import reduce_across_processes
from ...core.experts import routed_pass
from .base import ACTIVATIONS, Importance, register_importance, require_data


def expert_scoring(name: str, model, batches) -> tuple:
    """``(model, blocks, device)`` for an expert criterion: the unwrapped model, its ``experts`` blocks and its
    device; a ``ValueError`` without calibration data or without routed experts, before any pass runs."""
    require_data(name, batches)
    model = unwrap(model)
    blocks = list(iter_blocks(model, kind="experts"))
    if not blocks:
        raise ValueError(f"this {model.config.model_type} model has no routed experts to score; the expert criteria "
                         "(reap, frequency) need a mixture-of-experts model")
    return model, blocks, next(model.parameters()).device


@register_importance
class RoutingFrequency(Importance):
    name = "frequency"
    signal = ACTIVATIONS
    experts_only = True

    def score(self, model, batches=None) -> dict:
        model, blocks, device = expert_scoring(self.name, model, batches)
        counts = {b.key: torch.zeros(b.units, device=device) for b in blocks}
        tokens = {b.key: torch.zeros((), device=device) for b in blocks}

        def on_route(block, x, _weights, index):
            counts[block.key] += torch.bincount(index.reshape(-1), minlength=block.units).to(device).float()
            tokens[block.key] += len(x)

        routed_pass(model, batches, on_route, self.name)
        counts, tokens = reduce_across_processes(counts), reduce_across_processes(tokens)
        if not any(float(t) > 0 for t in tokens.values()):
            raise ValueError("the calibration data is empty")
        return {key: counts[key] / tokens[key].clamp_min(1.0) for key in counts}

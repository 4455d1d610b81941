# Copyright hfprune contributors. Apache-2.0.
"""Random scores: the baseline every criterion must beat. Seeded, so every rank draws the same."""

from __future__ import annotations

import torch

from ...core.masking import Masks
from .base import WEIGHTS, Importance, register_importance


@register_importance
class RandomImportance(Importance):
    name = "random"
    signal = WEIGHTS  # none, in fact: it reads only the model's shapes
    seeded = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, batches=None) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        # every unit, routed experts too (for other models the same draws as before they existed)
        return {k: torch.rand(v.shape, generator=g) for k, v in Masks(model).gates.items()}

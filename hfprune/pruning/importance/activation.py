# Copyright hfprune contributors. Apache-2.0.
"""Activation: mean magnitude of each head's output and each neuron's activation on calibration data
(as in Minitron), read at the input of the block's output projection.

During training (``PruningCallback`` without calibration data) the same per-token norms are summed over the
training batches of each pruning interval (:meth:`ActivationImportance.activation_terms`): a sum, not a mean,
which ranks the units of a block the same way.
"""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.calibration import reduce_across_processes, token_rows, watched_pass
from .base import ACTIVATIONS, Importance, register_importance, require_data, zero_scores


@register_importance
class ActivationImportance(Importance):
    name = "activation"
    signal = ACTIVATIONS
    training_signal = ACTIVATIONS

    def activation_terms(self, x: torch.Tensor, units: int) -> torch.Tensor:
        """Each unit's output norm per token row of ``x`` (tokens, units * width), summed over the rows: (units,)."""
        return x.reshape(-1, units, x.shape[-1] // units).norm(dim=-1).sum(0)

    def block_stats(self, x: torch.Tensor, units: int) -> dict:
        return {"norms": self.activation_terms(x.float(), units)}

    def block_score(self, block, stats: dict, count: torch.Tensor) -> torch.Tensor:
        return stats["norms"] / count.clamp_min(1.0)

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        sums, counts, current = {}, {}, {}

        def hook(key, groups, _module):
            def fn(_m, args):
                x = token_rows(args[0].detach(), current["batch"])  # (tokens, groups * width), no padding
                sums[key] = sums.get(key, 0) + self.block_stats(x, groups)["norms"]
                counts[key] = counts.get(key, 0) + x.shape[0]

            return fn

        watched_pass(model, batches, hook, self.name, current)
        # sums and counts are reduced separately: a mean of per-rank means is wrong when ranks see unequal data;
        # emptiness is judged after the reduction, so a rank without data does not leave the others waiting
        zeros = zero_scores(model)
        sums = reduce_across_processes({k: sums.get(k, z) + z for k, z in zeros.items()})
        counts = reduce_across_processes({k: torch.tensor(float(counts.get(k, 0)), device=device) for k in zeros})
        if not any(float(c) > 0 for c in counts.values()):
            raise ValueError("the calibration data is empty")
        return {k: self.block_score(None, {"norms": sums[k]}, counts[k]) for k in zeros}

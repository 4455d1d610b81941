# Copyright hfprune contributors. Apache-2.0.
"""Fluctuation (An et al. 2024, FLAP): how much a unit's contribution to the residual stream varies over the
calibration tokens, ``sum_d Var(x_d) * |W[:, d]|^2`` over the unit's input features ``d`` of the block's output
projection ``W``. A unit whose output barely varies can be replaced by its mean, which is what bias compensation
(``PruningConfig(bias_compensation=True)``) does; FLAP pairs the two."""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import get_block, merged_weight
from ...core.calibration import reduce_across_processes, token_rows, watched_pass
from ...core.sharded import full_view
from ...core.structure import in_features
from .base import ACTIVATIONS, Importance, register_importance, require_data, zero_scores


def fluctuation(total: torch.Tensor, squares: torch.Tensor, count: float, column_norms: torch.Tensor,
                units: int) -> torch.Tensor:
    """Per-unit score from per-feature sums, sums of squares and the token count (population variance), times the
    squared norms of the output projection's input columns, summed over each unit's ``features / units`` columns."""
    mean = total / max(count, 1.0)
    var = (squares / max(count, 1.0) - mean * mean).clamp_min(0.0)
    return (var * column_norms).reshape(units, -1).sum(-1)


def _column_norms(module) -> torch.Tensor:
    """``|W[:, d]|^2`` for every input feature ``d`` of a Linear, Conv1D or LoRA-wrapped projection (with an
    unmerged LoRA update included, as the forward pass applies it)."""
    return full_view(merged_weight(module)).double().pow(2).sum(0)  # FSDP2: the gathered weight


@register_importance
class FluctuationImportance(Importance):
    name = "fluctuation"
    signal = ACTIVATIONS  # a variance over calibration tokens: no training-time form, so the callback needs data

    def block_stats(self, x: torch.Tensor, units: int) -> dict:
        x = x.double()
        return {"sums": x.sum(0), "squares": x.pow(2).sum(0)}

    def block_score(self, block, stats: dict, count: torch.Tensor) -> torch.Tensor:
        norms = _column_norms(block.output_projection()).to(stats["sums"].device)
        return fluctuation(stats["sums"], stats["squares"], float(count), norms, block.units)

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        sums, squares, counts, watched, current = {}, {}, {}, {}, {}

        def hook(key, n, module):
            watched[key] = (module, n)

            def fn(_m, args):
                x = token_rows(args[0].detach(), current["batch"])  # padding positions are not tokens
                stats = self.block_stats(x, n)
                sums[key] = sums.get(key, 0) + stats["sums"]
                squares[key] = squares.get(key, 0) + stats["squares"]
                counts[key] = counts.get(key, 0) + x.shape[0]

            return fn

        watched_pass(model, batches, hook, self.name, current)
        # sums, squares and counts are reduced separately (every rank, every key) so unequal shards combine exactly;
        # emptiness is judged on the reduced counts, so a rank without data does not leave the others waiting
        features = {k: torch.zeros(in_features(m), dtype=torch.float64, device=device) for k, (m, _) in watched.items()}
        sums = reduce_across_processes({k: sums.get(k, z) + z for k, z in features.items()})
        squares = reduce_across_processes({k: squares.get(k, z) + z for k, z in features.items()})
        counts = reduce_across_processes({k: torch.tensor(float(counts.get(k, 0)), dtype=torch.float64,
                                                          device=device) for k in features})
        if not any(float(c) > 0 for c in counts.values()):
            raise ValueError("the calibration data is empty")
        scores = zero_scores(model)
        for key in watched:
            stats = {"sums": sums[key], "squares": squares[key]}
            scores[key] = self.block_score(get_block(model, key), stats, counts[key]).to(scores[key].dtype)
        return scores

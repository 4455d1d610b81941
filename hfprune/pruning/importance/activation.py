# Copyright hfprune contributors. Apache-2.0.
"""Activation: mean magnitude of each head's output and each neuron's activation on calibration data
(as in Minitron), read at the input of the block's output projection."""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import iter_blocks
from ...core.calibration import token_rows
from .base import (
    Importance,
    iterate,
    reduce_across_processes,
    register_importance,
    require_data,
    to_device,
    zero_scores,
)


def watch_output_projections(model, make_hook) -> list:
    """A forward pre-hook ``make_hook(block key, units, module)(module, args)`` on the output projection of every
    attention block (units: heads) and FFN (units: neurons) that still has units; returns the handles."""
    handles = []
    for block in iter_blocks(model):
        units = block.units
        if units:  # an emptied block has nothing to watch
            module = block.output_projection()
            handles.append(module.register_forward_pre_hook(make_hook(block.key, units, module)))
    return handles


def watched_pass(model, batches, make_hook, what: str, current: dict | None = None) -> None:
    """One no-grad pass over ``batches`` with :func:`watch_output_projections` hooks, removed afterwards even on
    error; ``current["batch"]`` holds the batch being run, for hooks that need its attention mask."""
    device = next(model.parameters()).device
    current = {} if current is None else current
    handles = watch_output_projections(model, make_hook)
    try:
        with torch.no_grad():
            for batch in iterate(batches, what):
                current["batch"] = to_device(batch, device)
                model(**current["batch"])
    finally:
        for h in handles:
            h.remove()


@register_importance
class ActivationImportance(Importance):
    name = "activation"

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        sums, counts, current = {}, {}, {}

        def hook(key, groups, _module):
            def fn(_m, args):
                x = token_rows(args[0].detach().float(), current["batch"])  # (tokens, groups * width), no padding
                per = x.reshape(-1, groups, x.shape[-1] // groups).norm(dim=-1)  # (tokens, groups)
                sums[key] = sums.get(key, 0) + per.sum(0)
                counts[key] = counts.get(key, 0) + per.shape[0]

            return fn

        watched_pass(model, batches, hook, self.name, current)
        # sums and counts are reduced separately: a mean of per-rank means is wrong when ranks see unequal data;
        # emptiness is judged after the reduction, so a rank without data does not leave the others waiting
        zeros = zero_scores(model)
        sums = reduce_across_processes({k: sums.get(k, z) + z for k, z in zeros.items()})
        counts = reduce_across_processes({k: torch.tensor(float(counts.get(k, 0)), device=device) for k in zeros})
        if not any(float(c) > 0 for c in counts.values()):
            raise ValueError("the calibration data is empty")
        return {k: sums[k] / counts[k].clamp_min(1.0) for k in zeros}


# Copyright hfprune contributors. Apache-2.0.
"""Per-layer candidates: a different FFN width and key/value group count in every layer, chosen by a knapsack.

Uniform shapes give every layer the same width, but layers are not equally sensitive. For each layer and each
narrower option (the FFN fractions of ``SearchConfig.layer_ladder``, every smaller key/value group count) the
search measures once how much the held-out loss (mean NLL) rises when *only that layer* is narrowed in the dense
model (cached like every candidate evaluation, so a new budget reuses them). Treating the rises as additive (the
first-order assumption of Puzzle-style block libraries), a knapsack over the kept layers then picks one option per
layer that minimises the summed rise while the budget's saving is met. For every grid point of the other axes
(depth, hidden size, experts) that gives one more candidate, scored like the others. Its layers differ, so it saves
with the generated modeling code, not as a plain checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch

from .enumerate import FIELD, Candidate, Shape, build_plan
from .evaluate import evaluate_plan

logger = logging.getLogger("hfprune")

UNITS = 2000  # the knapsack's resolution: the saving it must reach, in this many steps (rounded conservatively)


def layer_axes(config, geo) -> tuple:
    """The per-layer axes (``ffn``, ``heads``) that are searched and that the model has."""
    return tuple(a for a in ("ffn", "heads") if a in config.axes and a in geo.present)


def ladder(axis: str, geo, config) -> list:
    """The narrower counts a layer may take on ``axis``, largest first."""
    if axis == "heads":
        return list(range(geo.groups - 1, 0, -1))
    counts = {max(config.round_to, round(f * geo.ffn / config.round_to) * config.round_to) for f in config.layer_ladder}
    return sorted((c for c in counts if c < geo.ffn), reverse=True)


def bases(geo, config) -> list:
    """The grid points of the searched axes other than the per-layer ones, widths dense."""
    others = [a for a in config.axes if a in geo.present and a not in ("ffn", "heads")]
    dense = geo.dense_shape()
    return [dataclasses.replace(dense, **{FIELD[a]: v for a, v in zip(others, values)})
            for values in itertools.product(*(geo.grid(a, config) for a in others))]


def sensitivities(model, geo, scores: dict, config, held_out: list, cache, dense_nll: float) -> dict:
    """``{(axis, layer, count): rise of the held-out mean NLL}`` with only ``layer`` narrowed to ``count``."""
    dense = geo.dense_shape()
    out = {}
    for axis in layer_axes(config, geo):
        name = FIELD[axis]
        for i in range(geo.layers):
            for count in ladder(axis, geo, config):
                per = [getattr(dense, name)] * geo.layers
                per[i] = count
                shape = dataclasses.replace(dense, **{f"{name}_layers": tuple(per)})
                result, _, _ = evaluate_plan(model, build_plan(geo, scores, shape), held_out, cache)
                out[(axis, i, count)] = result["nll"] - dense_nll
        logger.info("per-layer sensitivities of %s: %d layers x %d options", axis, geo.layers,
                    len(ladder(axis, geo, config)))
    return out


def knapsack(items: list, need: float) -> list | None:
    """One option per item minimising the summed loss with a summed saving of at least ``need``; pure.

    ``items``: per item a list of ``(saving, loss)`` options (include ``(0, 0)`` to allow leaving it). Returns the
    chosen option index per item, or ``None`` when even the largest savings fall short. Savings are counted in
    ``need / UNITS`` steps, rounded down, so the choice never saves less than asked."""
    if need <= 0:
        return [min(range(len(opts)), key=lambda k: (opts[k][1], -opts[k][0])) for opts in items]
    step = need / UNITS
    target = torch.arange(UNITS + 1)
    best = torch.full((UNITS + 1,), float("inf"), dtype=torch.float64)  # best[u]: least loss saving >= u steps
    best[0] = 0.0
    picks = []
    for opts in items:
        units = [min(int(saving // step), UNITS) if saving > 0 else 0 for saving, _ in opts]
        # reaching u with option k needs u - units[k] (at least 0) from the items before
        cands = torch.stack([best[(target - n).clamp(min=0)] + loss for n, (_, loss) in zip(units, opts)])
        best, arg = cands.min(0)
        picks.append((arg, units))
    if not torch.isfinite(best[UNITS]):
        return None
    chosen, u = [], UNITS
    for arg, units in reversed(picks):
        k = int(arg[u])
        chosen.append(k)
        u = max(u - units[k], 0)
    return chosen[::-1]


def per_layer_candidates(geo, scores: dict, config, meter, sens: dict, bases: list) -> list:
    """One knapsack candidate per ``bases`` shape (the other axes' grid points, width dense) that meets the
    budget; ``sens`` from :func:`sensitivities`."""
    budget = config.ratio * meter.dense
    axes = layer_axes(config, geo)
    options = _options(axes, geo, config)
    out = []
    for base in bases:
        base_plan = build_plan(geo, scores, base)
        base_cost = meter.of(base_plan, base)
        kept = [i for i in range(geo.layers) if not (base_plan.layers[i] is not None and base_plan.layers[i].drop)]
        savings = {}
        for i in kept:
            if config.budget != "latency" and savings:  # every layer has the same size: the same savings
                savings[i] = savings[kept[0]]
                continue
            savings[i] = [base_cost - meter.of(build_plan(geo, scores, s), s)
                          for s in (_with(base, geo, {i: counts}) for counts in options)]
        items = [[(savings[i][k], sum(sens[(a, i, c)] for a, c in counts.items() if c is not None))
                  for k, counts in enumerate(options)] for i in kept]
        choice = knapsack(items, base_cost - budget)
        if choice is None:
            continue
        shape = _with(base, geo, {i: options[k] for i, k in zip(kept, choice)}, kept)
        plan = build_plan(geo, scores, shape)
        costs = meter.costs(plan, shape)
        if costs[config.budget] > budget * (1 + 1e-9):  # the additive savings were optimistic: not a candidate
            logger.info("per-layer candidate over budget by %.3g; skipped", costs[config.budget] / budget - 1)
            continue
        out.append(Candidate(shape, plan, costs, costs[config.budget] / meter.dense))
    return out


def _options(axes: tuple, geo, config) -> list:
    """Every per-layer choice: ``{axis: narrower count or None (dense)}`` over the per-layer axes."""
    combos = [{}]
    for axis in axes:
        combos = [{**c, axis: n} for c in combos for n in [None, *ladder(axis, geo, config)]]
    return combos


def _with(base: Shape, geo, counts: dict, kept: list | None = None) -> Shape:
    """``base`` with layer ``i`` narrowed to ``counts[i]`` (``{axis: count or None}``); with ``kept`` (the layers
    not dropped) ``groups`` / ``ffn`` become the means over them, for the table."""
    values = {}
    for axis, name in (("heads", "groups"), ("ffn", "ffn")):
        dense = getattr(base, name)
        if dense is None:
            continue
        per = [dense] * geo.layers
        for i, c in counts.items():
            if c.get(axis) is not None:
                per[i] = c[axis]
        values[f"{name}_layers"] = tuple(per)
        if kept:
            values[name] = round(sum(per[i] for i in kept) / len(kept))
    return dataclasses.replace(base, **values)

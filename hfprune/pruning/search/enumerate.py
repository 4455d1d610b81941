# Copyright hfprune contributors. Apache-2.0.
"""Candidate shapes under a budget, built from the axes' sorted scores without rescoring.

A :class:`Shape` is a count per axis: layers kept (the least influential dropped), hidden channels, key/value groups
and FFN neurons per layer, routed experts per layer, the same in every layer. The solved axis (``SearchConfig.
solve_axis``) takes the largest count that meets the budget given the others, which come from their grids; the
budget's cost of a shape is :func:`hfprune.core.cost.estimate` of its plan (plus the KV cache for ``memory``, the
latency table's prediction for ``latency``), so whatever the budget counts, every candidate meets it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...core import cost
from ...core.apply import model_dims, unwrap
from ...core.blocks import iter_blocks
from ...core.hidden import hidden_size, supports_hidden
from ...core.plan import PrunePlan
from ..depth import layer_param_counts
from ..hidden import hidden_step
from .config import AXES, SearchConfig


@dataclass(frozen=True)
class Shape:
    """Kept counts: ``layers``, ``hidden`` channels, key/value ``groups`` and ``ffn`` neurons per layer,
    ``experts`` per layer (``None``: the model has no such axis)."""

    layers: int
    hidden: int | None = None
    groups: int | None = None
    ffn: int | None = None
    experts: int | None = None
    # per-layer shapes (:mod:`.per_layer`): a count per dense layer (a dropped layer's is ignored); ``groups`` and
    # ``ffn`` are then the means over the kept layers, for the table
    groups_layers: tuple | None = None
    ffn_layers: tuple | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        return {k: v for k, v in out.items() if not k.endswith("_layers") or v is not None}

    def count(self, name: str, i: int) -> int | None:
        """Layer ``i``'s kept ``groups`` or ``ffn``."""
        per = getattr(self, f"{name}_layers")
        return per[i] if per is not None else getattr(self, name)


FIELD = {"depth": "layers", "hidden": "hidden", "heads": "groups", "ffn": "ffn", "experts": "experts"}


@dataclass(frozen=True)
class Geometry:
    """The dense model's sizes per axis and the steps each may take."""

    layers: int
    droppable: bool
    hidden: int | None
    hidden_step: int
    heads: int | None  # query heads per layer
    groups: int | None  # key/value groups per layer
    head_dim: int | None
    ffn: int | None
    experts: int | None
    top_k: int
    model_type: str

    @property
    def present(self) -> tuple:
        have = {"depth": self.droppable and self.layers > 1, "hidden": self.hidden is not None,
                "heads": bool(self.groups), "ffn": bool(self.ffn), "experts": bool(self.experts)}
        return tuple(a for a in AXES if have[a])

    def dense_shape(self) -> Shape:
        return Shape(self.layers, self.hidden, self.groups, self.ffn, self.experts)

    def options(self, axis: str, config: SearchConfig) -> list:
        """Every count the axis may keep, largest first."""
        if axis == "depth":
            return list(range(self.layers, config.min_layers - 1, -1))
        if axis == "hidden":
            return list(range(self.hidden // self.hidden_step * self.hidden_step, 0, -self.hidden_step))
        if axis == "heads":
            return list(range(self.groups, 0, -1))
        if axis == "ffn":
            top = self.ffn // config.round_to * config.round_to
            return ([self.ffn] if top != self.ffn else []) + list(range(top, 0, -config.round_to))
        return list(range(self.experts, max(self.top_k, 1) - 1, -1))

    def grid(self, axis: str, config: SearchConfig) -> list:
        """The counts of the axis' kept fractions (each rounded to the nearest allowed count)."""
        options = self.options(axis, config)
        dense = options[0]
        picked = [min(options, key=lambda n: (abs(n - f * dense), -n)) for f in config.grid_for(axis)]
        return sorted(set(picked), reverse=True)


def geometry(model: nn.Module, config: SearchConfig) -> Geometry:
    """The dense sizes; a model whose layers differ (already pruned per layer) is refused."""
    model = unwrap(model)
    layers = model_dims(model)["layers"]
    shapes = {tuple(sorted(blocks.items())) for blocks in layers}
    if len(shapes) != 1:
        raise ValueError("the shape search needs every layer to have the same structure (uniform candidates); this "
                         f"model's {len(layers)} layers differ")
    blocks = layers[0]
    heads, groups = blocks.get("heads", (None, None))
    head_dim, top_k = None, 0
    for block in iter_blocks(model):
        if block.key.index != 0:
            continue
        if block.kind == "heads":
            head_dim = block.dims()[2]
        if block.kind == "experts":
            top_k = block.top_k()
    try:
        droppable = len(layer_param_counts(model)) > 1
    except ValueError:
        droppable = False
    h = hidden_size(model) if supports_hidden(model) else None
    geo = Geometry(layers=len(layers), droppable=droppable, hidden=h, hidden_step=hidden_step(model, 1) if h else 1,
                   heads=heads, groups=groups, head_dim=head_dim, ffn=blocks.get("ffn", (None,))[0],
                   experts=blocks.get("experts", (None,))[0], top_k=top_k, model_type=model.config.model_type)
    if h and "heads" in config.axes and groups and geo.hidden_step != 1:
        # the stock config wants num_attention_heads to divide the hidden size: every head count the search may
        # keep must, so that any candidate is a plain checkpoint (unless that leaves too few hidden sizes)
        solved = config.solve_axis(geo.present) == "heads"
        counts = geo.options("heads", config) if solved else geo.grid("heads", config)
        step = math.lcm(geo.hidden_step, *(g * (heads // groups) for g in counts))
        if step <= h // 4:
            geo = dataclasses.replace(geo, hidden_step=step)
    return geo


def _top(scores: torch.Tensor, n: int) -> list:
    return sorted(torch.topk(scores.float(), n).indices.tolist())


def build_plan(geo: Geometry, scores: dict, shape: Shape) -> PrunePlan:
    """The plan of ``shape``: the least influential layers dropped, the best-scored units kept in each layer."""
    n_layers = geo.layers
    entries: list = [{} for _ in range(n_layers)]
    if shape.layers < n_layers:
        influence = scores["depth"].float()
        order = sorted(range(n_layers), key=lambda i: (float(influence[i]), i))
        for i in order[: n_layers - shape.layers]:
            entries[i] = {"drop": True}
    blocks = scores.get("blocks", {})
    for i, entry in enumerate(entries):
        if entry.get("drop"):
            continue
        groups, ffn = shape.count("groups", i), shape.count("ffn", i)
        if groups is not None and groups < geo.groups:
            group = geo.heads // geo.groups
            s = blocks[("layers", i, "heads")].float().reshape(geo.groups, group).sum(1)
            entry["heads"] = [g * group + j for g in _top(s, groups) for j in range(group)]
        if ffn is not None and ffn < geo.ffn:
            entry["ffn"] = _top(blocks[("layers", i, "ffn")], ffn)
        if shape.experts is not None and shape.experts < geo.experts:
            entry["experts"] = _top(scores["experts"][("layers", i, "experts")], shape.experts)
    data = {"layers": entries, "model_type": geo.model_type}
    if shape.hidden is not None and shape.hidden < geo.hidden:
        data["hidden"] = _top(scores["hidden"], shape.hidden)
    return PrunePlan.from_dict(data)


class Meter:
    """The budget's quantity of a plan (parameters, MACs, bytes, or predicted seconds) on ``model``."""

    def __init__(self, model: nn.Module, config: SearchConfig, geo: Geometry, latency=None):
        self.model, self.config, self.geo, self.latency = unwrap(model), config, geo, latency
        self.bytes = next(self.model.parameters()).element_size()
        if config.budget == "latency" and latency is None:
            raise ValueError("a latency budget needs a latency table (hfprune.pruning.latency.measure(model))")
        self.dense = self.of(None, geo.dense_shape())

    def costs(self, plan: PrunePlan | None, shape: Shape) -> dict:
        """``params``, ``macs`` and ``memory`` (bytes) of a plan; ``latency`` too with a table."""
        est = cost.estimate(self.model, plan, seq_len=self.config.seq_len)
        kv = 0
        if self.geo.groups:  # k and v, per kept layer, per key/value head
            dropped = [plan is not None and plan.layers[i] is not None and plan.layers[i].drop
                       for i in range(self.geo.layers)]
            heads = sum(shape.count("groups", i) for i in range(self.geo.layers) if not dropped[i])
            kv = 2 * heads * self.geo.head_dim * self.config.context * self.config.kv_batch * self.bytes
        out = {"params": est.params, "macs": est.macs, "memory": est.params * self.bytes + kv}
        if self.latency is not None:
            out["latency"] = self.latency.predict(self._counts(plan, shape))
        return out

    def of(self, plan: PrunePlan | None, shape: Shape) -> float:
        return float(self.costs(plan, shape)[self.config.budget])

    def _counts(self, plan: PrunePlan | None, shape: Shape) -> dict:
        counts = {}
        for key in self.latency.entries:
            stack, i, block = key
            layer = plan.layers[i] if plan is not None else None
            if layer is not None and layer.drop:
                counts[key] = 0
            elif block == "heads" and shape.groups is not None:
                counts[key] = shape.count("groups", i) * (self.geo.heads // self.geo.groups)
            elif block == "ffn" and shape.ffn is not None:
                counts[key] = shape.count("ffn", i)
        return counts


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    plan: PrunePlan
    costs: dict
    fraction: float  # of the dense budget quantity


def enumerate_candidates(model: nn.Module, scores: dict, config: SearchConfig, geo: Geometry, meter: Meter) -> list:
    """Every shape on the grid of the searched axes (but the solved one) whose solved count meets the budget."""
    present = geo.present
    axes = [a for a in config.axes if a in present]
    if not axes:
        raise ValueError(f"none of the searched axes {list(config.axes)} can shrink in this "
                         f"{geo.model_type} model; it has {list(present)}")
    solve = config.solve_axis(tuple(present))
    budget = config.ratio * meter.dense
    dense = geo.dense_shape()
    grids = {a: geo.grid(a, config) for a in axes if a != solve}
    combos = [{}]
    for axis, values in grids.items():
        combos = [{**c, FIELD[axis]: v} for c in combos for v in values]
    out, seen = [], set()
    for combo in combos:
        base = Shape(**{**dense.to_dict(), **combo})
        found = _solve(geo, scores, config, meter, base, solve, budget)
        if found is None or found[0] in seen:
            continue
        shape, plan, costs = found
        seen.add(shape)
        out.append(Candidate(shape, plan, costs, costs[config.budget] / meter.dense))
    if not out:
        raise ValueError(f"no {'/'.join(axes)} shape meets budget={config.budget!r} ratio={config.ratio} "
                         f"({budget:,.6g} of the dense {meter.dense:,.6g}); give a larger ratio or more axes")
    return out


def _solve(geo: Geometry, scores: dict, config: SearchConfig, meter: Meter, base: Shape, axis: str,
           budget: float) -> tuple | None:
    """(shape, plan, costs) with the largest count of ``axis`` that meets ``budget`` (costs fall as counts do: a
    bisection over the allowed counts), or ``None``."""
    options = geo.options(axis, config)

    def at(n):
        shape = Shape(**{**base.to_dict(), FIELD[axis]: n})
        plan = build_plan(geo, scores, shape)
        costs = meter.costs(plan, shape)
        return shape, plan, costs

    lo, hi, best = 0, len(options) - 1, None
    while lo <= hi:  # options fall: find the first index whose cost fits
        mid = (lo + hi) // 2
        found = at(options[mid])
        if found[2][config.budget] <= budget * (1 + 1e-12):
            best, hi = found, mid - 1
        else:
            lo = mid + 1
    return best


def fraction_label(shape: Shape, geo: Geometry) -> str:
    """``30 layers, hidden 576, 3 KV groups (9 heads), FFN 1120, 6 experts`` (what the model has)."""
    parts = [f"{shape.layers} layers"]
    if shape.hidden is not None:
        parts.append(f"hidden {shape.hidden}")
    per = {n: getattr(shape, f"{n}_layers") for n in ("groups", "ffn")}
    if shape.groups is not None and per["groups"] is not None:
        parts.append(f"KV {min(per['groups'])}-{max(per['groups'])} per layer (mean {shape.groups})")
    elif shape.groups is not None:
        parts.append(f"{shape.groups * (geo.heads // geo.groups)} heads / {shape.groups} KV")
    if shape.ffn is not None and per["ffn"] is not None:
        parts.append(f"FFN {min(per['ffn'])}-{max(per['ffn'])} per layer (mean {shape.ffn})")
    elif shape.ffn is not None:
        parts.append(f"FFN {shape.ffn}")
    if shape.experts is not None:
        parts.append(f"{shape.experts} experts")
    return ", ".join(parts)



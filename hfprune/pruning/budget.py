# Copyright hfprune contributors. Apache-2.0.
"""Selection: importance scores + a budget -> PrunePlan. Pure functions; no model in here.

Units are what can be removed together: a head (or, for grouped-query attention, a whole key/value
group with its query heads) and a chunk of ``round_to`` neurons. Each unit has a score and a cost (MACs
or parameters, from :func:`hfprune.core.cost.unit_costs`). Global selection keeps units greedily by score per
cost until the budget is spent (a knapsack heuristic; with one cost per kind it is the mask search of Kwon
et al. 2022); per-layer selection keeps the same fraction in every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.plan import ATTENTION_BLOCKS, EXPERT_NEURON_MULTIPLE, PlanError, PrunePlan


@dataclass(frozen=True)
class Block:
    """One prunable block as selection sees it."""

    key: tuple  # (stack, layer, block name)
    scores: torch.Tensor  # (heads,) or (neurons,)
    unit_cost: float  # cost of one head / neuron (MACs or params)
    group: int = 1  # query heads per key/value group (attention); units are whole groups
    kv_unit_cost: float = 0.0  # extra cost per key/value group (its k and v rows)
    min_units: int = 0  # units every selection keeps (a MoE router's top-k experts)

    @property
    def is_attention(self) -> bool:
        return self.key[2] in ATTENTION_BLOCKS


@dataclass(frozen=True)
class Unit:
    key: tuple
    indices: tuple
    score: float
    cost: float


def units(block: Block, round_to: int = 1) -> list:
    """Removable units of a block, most important first."""
    s = block.scores.float()
    if block.is_attention:
        n_groups = len(s) // block.group
        per_group = s.reshape(n_groups, block.group).sum(1)
        order = torch.argsort(per_group, descending=True, stable=True).tolist()
        cost = block.group * block.unit_cost + block.kv_unit_cost
        return [Unit(block.key, tuple(range(g * block.group, (g + 1) * block.group)), float(per_group[g]), cost)
                for g in order]
    order = torch.argsort(s, descending=True, stable=True).tolist()
    chunks = [order[j : j + round_to] for j in range(0, len(order), round_to)]
    return [Unit(block.key, tuple(c), float(s[c].sum()), len(c) * block.unit_cost) for c in chunks]


def normalize(blocks: list) -> list:
    """Scale each block's scores so their mean equals the block's cost per head or neuron.

    For criteria whose raw scores are not on a common scale (weight norms, activations, random draws), the
    global ranking by score per cost then compares each unit's score relative to its own block's mean: neither a
    layer with larger raw scores nor the cheaper kind of unit wins by scale. (Scaling to unit mean alone would
    rank a head, which costs as much as dozens of neurons, like one neuron: whole attention blocks went first.)
    """
    out = []
    for b in blocks:
        mean = b.scores.float().mean() if b.scores.numel() else torch.tensor(1.0)
        scale = mean if mean > 0 else torch.tensor(1.0)
        per_unit = b.unit_cost + b.kv_unit_cost / b.group
        per_unit = per_unit if per_unit > 0 else 1.0
        out.append(Block(b.key, b.scores.float() / scale * per_unit, b.unit_cost, b.group, b.kv_unit_cost,
                         b.min_units))
    return out


def select_global(blocks: list, budget: float, fixed_cost: float = 0.0, min_heads: int = 0,
                  round_to: int = 1) -> dict:
    """Keep units by score per cost until ``fixed_cost + kept cost <= budget``.

    ``min_heads`` query heads per attention block are kept first (rounded up to whole groups).
    Returns ``{key: sorted kept indices}``. Raises :class:`PlanError` if even the minimum exceeds the budget.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    if min_heads < 0:
        raise ValueError(f"min_heads must be >= 0, got {min_heads}")
    kept: dict = {b.key: [] for b in blocks}
    spent = fixed_cost
    candidates = []
    for b in blocks:
        us = units(b, 1 if b.is_attention else round_to)
        forced = math.ceil(min(min_heads, len(b.scores)) / b.group) if b.is_attention else b.min_units
        for u in us[:forced]:
            kept[b.key] += u.indices
            spent += u.cost
        candidates += us[forced:]
    if spent > budget:
        raise PlanError(f"the budget {budget:,.0f} cannot be met: the fixed cost and the minimum of {min_heads} "
                        f"head(s) per layer already cost {spent:,.0f}")
    candidates.sort(key=lambda u: u.score / u.cost if u.cost > 0 else math.inf, reverse=True)
    for u in candidates:
        if spent + u.cost <= budget:
            kept[u.key] += u.indices
            spent += u.cost
    return {k: sorted(v) for k, v in kept.items()}


def select_per_layer(blocks: list, head_ratio: float | None, ffn_ratio: float | None, min_heads: int = 0,
                     round_to: int = 1, expert_ratio: float | None = None) -> dict:
    """Keep the top ``ratio`` of every block (rounded: heads to whole groups, neurons to ``round_to``; routed
    experts by ``expert_ratio``, and the neurons inside them by ``ffn_ratio``, the same number in every expert)."""
    for name, r in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio), ("expert_ratio", expert_ratio)):
        if r is not None and not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    kept = {}
    for b in blocks:
        ratio = expert_ratio if b.key[2] == "experts" else head_ratio if b.is_attention else ffn_ratio
        if ratio is None:
            continue
        n = len(b.scores)
        if b.key[2] == "expert_ffn":  # (experts * I,) scores, group = I: the top of each expert, as many in each
            per_expert = b.scores.float().reshape(-1, b.group)
            step = EXPERT_NEURON_MULTIPLE * math.ceil(round_to / EXPERT_NEURON_MULTIPLE)  # what the kernel runs
            count = min(b.group, max(step, step * round(ratio * b.group / step)))
            top = torch.argsort(per_expert, dim=1, descending=True, stable=True)[:, :count]
            kept[b.key] = sorted((top + torch.arange(len(per_expert))[:, None] * b.group).flatten().tolist())
            continue
        if b.is_attention:
            groups = round(ratio * n / b.group)
            groups = max(groups, math.ceil(min(min_heads, n) / b.group))
            chosen = units(b)[:groups]
        else:
            step = 1 if b.key[2] == "experts" else round_to  # whole experts are not rounded
            count = min(n, step * round(ratio * n / step))
            if count < b.min_units:
                raise PlanError(f"expert_ratio={ratio} keeps {count} of the {n} experts of {b.key}, fewer than the "
                                f"router's top-k ({b.min_units}); use expert_ratio >= {b.min_units / n:.3g}")
            chosen = units(b, 1)[:count]
        kept[b.key] = sorted(i for u in chosen for i in u.indices)
    return kept


def select_uniform(blocks: list, budget: float, fixed_cost: float = 0.0, min_heads: int = 0,
                   round_to: int = 1) -> dict:
    """The same number of kept key/value groups in every attention block and of kept neurons in every FFN block,
    chosen to keep the most total score within ``fixed_cost + kept cost <= budget``; per block, the best-scored
    units are the ones kept.

    Every count of groups is tried (there are few); for each, the FFN width is the largest multiple of
    ``round_to`` (or the full width) that fits, since scores are non-negative and more neurons never score less.
    All attention blocks must have the same heads and group size, and all FFN blocks the same width.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    if any(b.key[2] == "experts" for b in blocks):
        return _select_uniform_experts(blocks, budget, fixed_cost, min_heads, round_to)
    att = [b for b in blocks if b.is_attention]
    ffn = [b for b in blocks if not b.is_attention]
    for kind, bs, shape in (("attention", att, lambda b: (len(b.scores), b.group)), ("FFN", ffn,
                                                                                     lambda b: len(b.scores))):
        shapes = {shape(b) for b in bs}
        if len(shapes) > 1:
            raise PlanError(f"scope='uniform' needs the same {kind} size in every layer, found {sorted(shapes)}")
    n_groups = len(att[0].scores) // att[0].group if att else 0
    group = att[0].group if att else 1
    width = len(ffn[0].scores) if ffn else 0
    att_units = [units(b) for b in att]
    ffn_sorted = [torch.sort(b.scores.float(), descending=True, stable=True) for b in ffn]
    ffn_prefix = [torch.cat([torch.zeros(1), v.cumsum(0)]) for v, _ in ffn_sorted]
    per_neuron = sum(b.unit_cost for b in ffn)
    best = None
    for g in range(math.ceil(min(min_heads, n_groups * group) / group), n_groups + 1):
        spent = fixed_cost + sum(sum(u.cost for u in us[:g]) for us in att_units)
        room = budget - spent
        if room < 0:
            break  # more groups only cost more
        n = width if per_neuron == 0 else min(width, int(room // per_neuron + 1e-9))
        if n < width:
            n = round_to * (n // round_to)
        score = sum(sum(u.score for u in us[:g]) for us in att_units) + sum(float(p[n]) for p in ffn_prefix)
        if best is None or score > best[0]:
            best = (score, g, n)
    if best is None:
        raise PlanError(f"the budget {budget:,.0f} cannot be met with the same structure in every layer: the fixed "
                        f"cost and the minimum of {min_heads} head(s) per layer already exceed it")
    _, g, n = best
    kept = {b.key: sorted(i for u in us[:g] for i in u.indices) for b, us in zip(att, att_units)}
    kept |= {b.key: sorted(order[:n].tolist()) for b, (_, order) in zip(ffn, ffn_sorted)}
    return kept


def _select_uniform_experts(blocks: list, budget: float, fixed_cost: float, min_heads: int, round_to: int) -> dict:
    """:func:`select_uniform` with routed experts: every count of experts (from the routers' top-k up) is tried,
    each with the best uniform heads and widths that the rest of the budget allows; the best total score wins."""
    experts = [b for b in blocks if b.key[2] == "experts"]
    rest = [b for b in blocks if b.key[2] != "experts"]
    sizes = {len(b.scores) for b in experts}
    if len(sizes) > 1:
        raise PlanError(f"scope='uniform' needs the same number of experts in every layer, found {sorted(sizes)}")
    orders = [torch.argsort(b.scores.float(), descending=True, stable=True) for b in experts]
    best = None
    for count in range(max(1, max(b.min_units for b in experts)), sizes.pop() + 1):
        spent = fixed_cost + sum(count * b.unit_cost for b in experts)
        try:
            kept = select_uniform(rest, budget, spent, min_heads, round_to)
        except PlanError:
            break  # more experts only cost more
        score = sum(float(b.scores[o[:count]].float().sum()) for b, o in zip(experts, orders))
        score += sum(float(b.scores[list(kept.get(b.key, []))].float().sum()) for b in rest)
        if best is None or score > best[0]:
            best = (score, {**kept, **{b.key: sorted(o[:count].tolist()) for b, o in zip(experts, orders)}})
    if best is None:
        raise PlanError(f"the budget {budget:,.0f} cannot be met with the same structure in every layer: the fixed "
                        "cost and the routers' top-k experts per layer already exceed it")
    return best[1]


def to_plan(kept: dict, dims: dict, model_type: str | None = None) -> PrunePlan:
    """A plan from ``{(stack, layer, block): kept indices}``; blocks kept whole become ``null``."""
    stacks = {}
    for key, layers in dims.items():
        entries = []
        for i, blocks in enumerate(layers):
            entry = {}
            for name, size in blocks.items():
                keep = kept.get((key, i, name))
                entry[name] = None if keep is None or len(keep) == size[0] else list(keep)
            if entry.get("experts") is not None and entry.get("expert_ffn") is not None:  # only kept experts' neurons
                width = blocks["expert_ffn"][0] // blocks["experts"][0]
                experts = set(entry["experts"])
                entry["expert_ffn"] = [k for k in entry["expert_ffn"] if k // width in experts]
            entries.append(entry)
        stacks[key] = entries
    return PrunePlan.from_dict({**stacks, "model_type": model_type} if model_type else stacks)

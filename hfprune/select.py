# Copyright hfprune contributors. Apache-2.0.
"""Selection: importance scores + a budget -> PrunePlan. Pure functions; no model in here.

Units are what can be removed together: a head (or, for grouped-query attention, a whole key/value
group with its query heads) and a chunk of ``round_to`` neurons. Each unit has a score and a cost (MACs
or parameters, from :mod:`hfprune.cost`). Global selection keeps units greedily by score per cost until
the budget is spent (a knapsack heuristic; with one cost per kind it is the mask search of Kwon et al.
2022); per-layer selection keeps the same fraction in every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan import ATTENTION_BLOCKS, PlanError, PrunePlan


@dataclass(frozen=True)
class Block:
    """One prunable block as selection sees it."""

    key: tuple  # (stack, layer, block name)
    scores: torch.Tensor  # (heads,) or (neurons,)
    unit_cost: float  # cost of one head / neuron (MACs or params)
    group: int = 1  # query heads per key/value group (attention); units are whole groups
    kv_unit_cost: float = 0.0  # extra cost per key/value group (its k and v rows)

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
    """Scale each block's scores to unit mean, so layers with larger raw scores do not win by scale."""
    out = []
    for b in blocks:
        mean = b.scores.float().mean() if b.scores.numel() else torch.tensor(1.0)
        scale = mean if mean > 0 else torch.tensor(1.0)
        out.append(Block(b.key, b.scores.float() / scale, b.unit_cost, b.group, b.kv_unit_cost))
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
        forced = math.ceil(min(min_heads, len(b.scores)) / b.group) if b.is_attention else 0
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
                     round_to: int = 1) -> dict:
    """Keep the top ``ratio`` of every block (rounded: heads to whole groups, neurons to ``round_to``)."""
    for name, r in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
        if r is not None and not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    kept = {}
    for b in blocks:
        ratio = head_ratio if b.is_attention else ffn_ratio
        if ratio is None:
            continue
        n = len(b.scores)
        if b.is_attention:
            groups = round(ratio * n / b.group)
            groups = max(groups, math.ceil(min(min_heads, n) / b.group))
            chosen = units(b)[:groups]
        else:
            count = min(n, round_to * round(ratio * n / round_to))
            chosen = units(b, 1)[:count]
        kept[b.key] = sorted(i for u in chosen for i in u.indices)
    return kept


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
            entries.append(entry)
        stacks[key] = entries
    return PrunePlan.from_dict({**stacks, "model_type": model_type} if model_type else stacks)

"""Selection is pure: budgets respected, constraints honoured, unreachable budgets refused."""

import pytest
import torch

from hfprune import PlanError
from hfprune.select import Block, select_global, select_per_layer, to_plan, units


def _blocks():
    return [
        Block(("layers", 0, "heads"), torch.tensor([4.0, 1.0, 3.0, 2.0]), unit_cost=10.0),
        Block(("layers", 0, "ffn"), torch.arange(16, dtype=torch.float), unit_cost=1.0),
        Block(("layers", 1, "heads"), torch.tensor([0.5, 0.1, 0.2, 0.3]), unit_cost=10.0),
        Block(("layers", 1, "ffn"), torch.ones(16), unit_cost=1.0),
    ]


def test_global_keeps_best_score_per_cost_within_budget():
    kept = select_global(_blocks(), budget=50.0)
    cost = 10 * (len(kept[("layers", 0, "heads")]) + len(kept[("layers", 1, "heads")]))
    cost += len(kept[("layers", 0, "ffn")]) + len(kept[("layers", 1, "ffn")])
    assert cost <= 50
    # by score per cost: layer-0 neurons 15..1, layer-1 neurons (1/1), layer-0 head 0 (4/10) = 41; head 2 (3/10)
    # would overshoot, so the rest of the budget goes to the zero-score neuron 0; layer-1 heads never fit
    assert kept[("layers", 0, "ffn")] == list(range(16)) and kept[("layers", 1, "ffn")] == list(range(16))
    assert kept[("layers", 0, "heads")] == [0] and kept[("layers", 1, "heads")] == []


def test_min_heads_and_unreachable_budget():
    kept = select_global(_blocks(), budget=40.0, min_heads=2)
    assert kept[("layers", 0, "heads")] == [0, 2] and kept[("layers", 1, "heads")] == [0, 3]
    with pytest.raises(PlanError, match="cannot be met"):
        select_global(_blocks(), budget=30.0, min_heads=2)


def test_gqa_units_are_whole_groups():
    block = Block(("layers", 0, "heads"), torch.tensor([1.0, 1.0, 5.0, 0.0, 0.1, 0.1]), 1.0, group=2, kv_unit_cost=3.0)
    us = units(block)
    assert [u.indices for u in us] == [(2, 3), (0, 1), (4, 5)]
    assert us[0].cost == 2 * 1.0 + 3.0
    kept = select_global([block], budget=10.0)
    assert kept[block.key] == [0, 1, 2, 3]


def test_round_to_keeps_multiples():
    block = Block(("layers", 0, "ffn"), torch.rand(37, generator=torch.Generator().manual_seed(0)), 1.0)
    kept = select_global([block], budget=20.0, round_to=8)
    assert len(kept[block.key]) == 16
    per_layer = select_per_layer([block], None, 0.5, round_to=8)
    assert len(per_layer[block.key]) == 16


def test_per_layer_ratio_and_validation():
    kept = select_per_layer(_blocks(), head_ratio=0.5, ffn_ratio=0.25)
    assert kept[("layers", 0, "heads")] == [0, 2] and kept[("layers", 1, "heads")] == [0, 3]
    assert kept[("layers", 0, "ffn")] == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="head_ratio must be in"):
        select_per_layer(_blocks(), head_ratio=1.5, ffn_ratio=None)


def test_to_plan_marks_whole_blocks_null():
    dims = {"layers": [{"heads": (4, 4), "ffn": (16,)}]}
    plan = to_plan({("layers", 0, "heads"): [0, 1, 2, 3], ("layers", 0, "ffn"): [1, 2]}, dims)
    assert plan.to_dict()["layers"] == [{"heads": None, "ffn": [1, 2]}]

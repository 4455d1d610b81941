"""Selection is pure: budgets respected, constraints honoured, unreachable budgets refused."""

import pytest
import torch

from hfprune import PlanError
from hfprune.pruning.budget import Block, select_global, select_per_layer, to_plan, units


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


def test_uniform_keeps_the_same_counts_in_every_layer_within_budget():
    from hfprune.pruning.budget import select_uniform

    g = torch.Generator().manual_seed(0)
    blocks = [Block(("layers", i, "heads"), torch.rand(4, generator=g), unit_cost=10.0) for i in range(2)]
    blocks += [Block(("layers", i, "ffn"), torch.rand(16, generator=g), unit_cost=1.0) for i in range(2)]
    kept = select_uniform(blocks, budget=60.0, round_to=4)
    heads = {len(kept[("layers", i, "heads")]) for i in range(2)}
    neurons = {len(kept[("layers", i, "ffn")]) for i in range(2)}
    assert len(heads) == 1 and len(neurons) == 1 and neurons.pop() % 4 == 0
    cost = sum(10 * len(kept[("layers", i, "heads")]) + len(kept[("layers", i, "ffn")]) for i in range(2))
    assert 40 <= cost <= 60
    for b in blocks:  # within each layer the best-scored units are the kept ones
        k = kept[b.key]
        assert set(k) == set(torch.argsort(b.scores, descending=True)[: len(k)].tolist())


def test_uniform_with_gqa_groups_and_errors():
    from hfprune.pruning.budget import select_uniform

    att = [Block(("layers", i, "heads"), torch.tensor([1.0, 1.0, 5.0, 0.0]), 1.0, group=2, kv_unit_cost=1.0)
           for i in range(3)]
    kept = select_uniform(att, budget=9.0)
    assert all(kept[b.key] == [2, 3] for b in att)  # 3 blocks x one group (cost 3) = 9
    with pytest.raises(PlanError, match="cannot be met"):
        select_uniform(att, budget=5.0, min_heads=1)
    mixed = att + [Block(("layers", 3, "heads"), torch.ones(6), 1.0, group=2)]
    with pytest.raises(PlanError, match="same attention size"):
        select_uniform(mixed, budget=100.0)


def test_normalized_scores_rank_heads_and_neurons_by_their_share_of_their_block():
    from hfprune.pruning.budget import normalize

    # the same spread of scores in both blocks: a 50% budget must cut heads and neurons alike, not drop the
    # costly heads first
    blocks = [Block(("layers", 0, "heads"), torch.tensor([3.0, 3.0, 1.0, 1.0]), unit_cost=40.0),
              Block(("layers", 0, "ffn"), torch.tensor([3.0, 1.0]).repeat_interleave(80), unit_cost=1.0)]
    kept = select_global(normalize(blocks), budget=160.0)
    assert len(kept[("layers", 0, "heads")]) == 2 and len(kept[("layers", 0, "ffn")]) == 80

"""Per-layer candidates of the shape search (hfprune.pruning.search.per_layer): the knapsack finds the optimum of
small problems (checked by brute force), every per-layer candidate meets its budget and follows the knapsack's
choice, a chosen per-layer shape reloads (generated modeling code) to identical logits, bad settings are refused."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import transformers as T

from hfprune.core.cost import estimate
from hfprune.pruning.search import SearchConfig, search
from hfprune.pruning.search.per_layer import UNITS, knapsack


def _llama(layers: int = 4) -> T.LlamaForCausalLM:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=99, hidden_size=36, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=3, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def _data(n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 99, (4, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_on_small_problems(seed):
    rng = random.Random(seed)
    items = [[(0.0, 0.0)] + [(rng.randint(1, 40) * 1.0, rng.uniform(-0.2, 3.0)) for _ in range(3)]
             for _ in range(4)]
    need = rng.randint(10, 100) * 1.0
    step = need / UNITS
    feasible = [c for c in itertools.product(*(range(len(o)) for o in items))
                if sum(int(items[i][k][0] // step) for i, k in enumerate(c)) >= UNITS]
    choice = knapsack(items, need)
    if not feasible:
        assert choice is None
        return
    assert sum(items[i][k][0] for i, k in enumerate(choice)) >= need  # never saves less than asked
    best = min(sum(items[i][k][1] for i, k in enumerate(c)) for c in feasible)
    assert sum(items[i][k][1] for i, k in enumerate(choice)) == pytest.approx(best, abs=1e-12)


def test_knapsack_without_a_saving_to_make_keeps_the_cheapest_loss():
    assert knapsack([[(0.0, 0.0), (5.0, 1.0)], [(0.0, 0.0), (5.0, -1.0)]], 0.0) == [0, 1]
    assert knapsack([[(0.0, 0.0), (5.0, 1.0)]], 6.0) is None


def test_per_layer_candidates_meet_the_budget_and_reload(tmp_path):
    model, data = _llama(), _data()
    dense_params = sum(p.numel() for p in model.parameters())
    config = SearchConfig(ratio=0.8, eval_examples=4, per_layer=True, layer_ladder=(0.75, 0.5, 0.25),
                          axes=("depth", "heads", "ffn"), grid={"depth": [1, 0.75]})
    result = search(model, data, config)
    per_layer = [r for r in result.rows if "ffn_layers" in r["shape"]]
    assert len(per_layer) == 2  # one per depth grid point
    # sensitivities: 4 layers x (3 FFN options + 2 smaller KV group counts)
    assert result.extra["per_layer_evaluations"] == 4 * (3 + 2)
    for row in result.rows:
        assert row["params"] <= 0.8 * dense_params
    for row in per_layer:
        plan = row["plan"]
        kept = [i for i, e in enumerate(plan["layers"]) if not e.get("drop")]
        assert len(kept) == row["shape"]["layers"]
        for i in kept:  # the plan keeps what the shape's per-layer counts say, each a ladder step or dense
            ffn = len(plan["layers"][i].get("ffn", range(64)))
            assert ffn == row["shape"]["ffn_layers"][i] and ffn in (64, 48, 32, 16)
            heads = len(plan["layers"][i].get("heads", range(6)))
            assert heads == 2 * row["shape"]["groups_layers"][i]
    # the per-layer shapes cost what the estimate says for their plans
    chosen = result.best
    assert sum(p.numel() for p in model.parameters()) == chosen["params"]
    if "ffn_layers" not in chosen["shape"]:  # make sure a per-layer model is saved and reloaded too
        from hfprune import apply_plan

        model = apply_plan(_llama(), per_layer[0]["plan"])
        assert estimate(model).params == per_layer[0]["params"]
    model.save_pretrained(tmp_path / "m")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    ids = data[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"layer_ladder": (0.5, 1.0)}, "layer_ladder"),
    ({"layer_ladder": ()}, "layer_ladder"),
    ({"per_layer": "yes"}, "per_layer"),
])
def test_bad_per_layer_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_per_layer_without_a_width_axis_is_refused_before_any_pass():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="per_layer=True"):
        search(model, _data(), SearchConfig(ratio=0.8, eval_examples=4, per_layer=True, axes=("depth",)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_flags_reach_the_search_config(tmp_path):
    import argparse

    from hfprune.pipeline.cli_search import build_parser, search_config

    def parse(*extra):
        args = build_parser(argparse.ArgumentParser()).parse_args(
            [str(tmp_path), "--output", str(tmp_path / "o"), "--params_ratio", "0.7", *extra])
        return search_config(args)

    assert parse().per_layer is False
    config = parse("--per_layer", "--layer_ladder", "0.5,0.75")
    assert config.per_layer is True and config.layer_ladder == (0.75, 0.5)
    assert parse("--no_finalist_per_kind").finalist_per_kind is False
    with pytest.raises(ValueError, match="--layer_ladder 'half'"):
        parse("--per_layer", "--layer_ladder", "half")
    with pytest.raises(ValueError, match="layer_ladder"):
        parse("--per_layer", "--layer_ladder", "0.5,1.5")

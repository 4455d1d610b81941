"""The analytic cost model predicts the sliced model exactly (parameters) and orders plans right (MACs)."""

import copy

import pytest
import torch
import transformers as T

import hfprune
from hfprune.core.apply import model_dims
from hfprune.core.blocks import iter_blocks
from hfprune.core.cost import estimate, unit_costs

from .cases import CASES, random_plan


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _dense(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return CASES[model_type].build(CASES[model_type].attn_implementations[0])


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_params_predict_the_sliced_model(model_type, seed):
    dense = _dense(model_type, seed)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    plan = random_plan(dense, seed)
    predicted = estimate(dense, plan)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    actual = _numel(sliced)
    assert predicted.params == actual
    assert actual < _numel(dense)
    # the sliced model (empty blocks included) costs what was predicted, and needs no plan for it
    now = estimate(sliced)
    assert now.params == actual
    assert now.macs == predicted.macs
    # the dense model as it is: exactly its parameter count; estimate never touches the model
    assert estimate(dense, None).params == _numel(dense)
    assert estimate(dense).macs > predicted.macs
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _nested_plans(model, seed: int) -> list:
    """Plans that each remove strictly more than the one before: keep sets shrink, then a layer goes."""
    g = torch.Generator().manual_seed(seed)
    dims = model_dims(model)
    order = {(key, i, name): torch.randperm(size[0], generator=g).tolist()
             for key, layers in dims.items() for i, blocks in enumerate(layers) for name, size in blocks.items()}
    plans = []
    for fraction in (0.75, 0.5, 0.25):
        plan = {}
        for key, layers in dims.items():
            entries = []
            for i, blocks in enumerate(layers):
                entry = {}
                for name, size in blocks.items():
                    if name in ("heads", "cross_heads"):  # whole query heads per kept key/value group
                        heads, kv_heads = size
                        group = heads // kv_heads
                        per_group = max(1, round(group * fraction)) if group > 1 else 1
                        groups = kv_heads if group > 1 else max(1, round(kv_heads * fraction))
                        entry[name] = [gi * group + h for gi in range(groups) for h in range(per_group)]
                    else:  # a shrinking prefix of one random order: each keep set is inside the last
                        entry[name] = sorted(order[(key, i, name)][:max(1, round(size[0] * fraction))])
                entries.append(entry)
            plan[key] = entries
        plans.append(plan)
    # the last: also drop the last layer of every stack that can lose one (and has more than one)
    spec = hfprune.get_adapter(model).arch_spec(model.config)
    last = copy.deepcopy(plans[-1])
    for key, entries in last.items():
        if spec.stacks[key].droppable and len(entries) > 1:
            entries[-1] = {"drop": True}
    plans.append(last)
    return plans


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_macs_fall_as_more_is_removed(model_type):
    dense = _dense(model_type)
    costs = [estimate(dense)] + [estimate(dense, p) for p in _nested_plans(dense, 0)]
    macs = [c.macs for c in costs]
    params = [c.params for c in costs]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    assert all(a > b for a, b in zip(params, params[1:])), params
    assert all(m > 0 for m in macs)
    # MACs grow with the sequence length, and attention makes them grow faster than linearly
    short, long = estimate(dense, seq_len=8).macs, estimate(dense, seq_len=16).macs
    assert long > 2 * short


def test_macs_by_hand_on_one_bert_layer():
    config = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=64)
    model = T.BertModel(config)
    hidden, head_dim, ffn, seq = 32, 8, 37, 10
    # q, k, v and o: one MAC per weight per token; QK^T and AV: 2 * heads * head_dim * seq per query token
    dense_macs = seq * (3 * hidden * 4 * head_dim + 4 * head_dim * hidden) + 2 * 4 * head_dim * seq * seq
    dense_macs += seq * (hidden * ffn + ffn * hidden)
    report = estimate(model, seq_len=seq)
    assert report.macs == dense_macs
    assert report.layers[0].macs == dense_macs

    plan = {"layers": [{"heads": [1, 3], "ffn": list(range(0, 37, 3))}]}  # 2 heads, 13 neurons
    kept_macs = seq * (3 * hidden * 2 * head_dim + 2 * head_dim * hidden) + 2 * 2 * head_dim * seq * seq
    kept_macs += seq * (hidden * 13 + 13 * hidden)
    report = estimate(model, plan, seq_len=seq)
    assert report.macs == kept_macs
    assert report.layers[0].heads == {"heads": 2} and report.layers[0].neurons == {"ffn": 13}
    removed_params = 2 * head_dim * (3 * hidden + 3) + 2 * head_dim * hidden + (37 - 13) * (2 * hidden + 1)
    assert report.params == _numel(model) - removed_params

    # an emptied attention block costs no MACs; its output bias stays in the parameters
    report = estimate(model, {"layers": [{"heads": [], "ffn": []}]}, seq_len=seq)
    assert report.macs == 0
    pruned = hfprune.apply_plan(copy.deepcopy(model), {"layers": [{"heads": [], "ffn": []}]})
    assert report.params == _numel(pruned)


@pytest.mark.parametrize("seq_len", [0, -3])
def test_seq_len_below_one_raises(seq_len):
    model = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=16))
    with pytest.raises(ValueError, match="seq_len"):
        estimate(model, seq_len=seq_len)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_unit_costs_are_what_removing_a_unit_saves(model_type):
    """``unit_costs`` (which selection and ``estimate`` share): removing one neuron, or one key/value group's heads,
    from layer 0 saves its weights and biases in the sliced model, and its MACs in the estimate."""
    dense = _dense(model_type)
    seq = 8
    checked = 0
    for block in iter_blocks(dense):
        if block.key.index != 0:
            continue
        unit = unit_costs(block, seq)
        group = unit.group
        if unit.units <= group:  # removing a whole group would empty the block: another cost (tested above)
            continue
        plan = {key: [{} for _ in layers] for key, layers in model_dims(dense).items()}
        plan[block.key.stack][0][block.key.name] = list(range(group, unit.units))  # all but group 0
        saved_params = group * (unit.params + unit.bias) + unit.kv_params + unit.kv_bias
        sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
        assert _numel(dense) - _numel(sliced) == saved_params, block.key
        assert estimate(dense, seq_len=seq).macs - estimate(dense, plan, seq_len=seq).macs == \
            group * unit.macs + unit.kv_macs, block.key
        checked += 1
    assert checked

"""The one walk over a model (hfprune.core.blocks), for every registered adapter: it visits every block of the spec in
forward order, the weight slices it names for a set of units are exactly what slicing those units removes, and its
weight views see through LoRA as peft's own merge does."""

import copy

import pytest
import torch

import hfprune
from hfprune.core.apply import unwrap
from hfprune.core.arch import get_adapter
from hfprune.core.blocks import BlockKey, get_block, iter_blocks, iter_layers, merged_weight, weight_out_in
from hfprune.core.structure import get_module

from .cases import CASES, random_plan
from .test_exactness import _run, assert_close

MODEL_TYPES = sorted(CASES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_iter_blocks_visits_every_block_of_the_spec_in_forward_order(model_type):
    case = CASES[model_type]
    model = case.build(case.attn_implementations[0]).eval()
    spec = get_adapter(model).arch_spec(model.config)
    expected = [(key, i, name) for key, stack in spec.stacks.items()
                for i in range(len(get_module(model.base_model, stack.layers)))
                for name in [*stack.attention, *stack.ffn]]
    blocks = list(iter_blocks(model))
    assert [b.key for b in blocks] == expected
    assert [b.key for b in iter_blocks(model, kind="heads")] == [b.key for b in blocks if b.is_attention]
    assert [b.key for b in iter_blocks(model, kind="ffn")] == [b.key for b in blocks if not b.is_attention]
    for b in blocks:
        again = get_block(model, tuple(b.key))
        assert isinstance(b.key, BlockKey) and again.layer is b.layer and again.spec == b.spec
        assert b.units > 0 and not b.is_empty()
    # forward order: the layers' output projections first run in the order the walk gives their layers
    ran: list = []
    handles = [b.output_projection().register_forward_pre_hook(
        lambda _m, _a, where=b.key[:2]: None if where in ran else ran.append(where)) for b in blocks]
    with torch.no_grad():
        model(**case.inputs(0))
    for h in handles:
        h.remove()
    assert ran == [(key, i) for key, i, _, _ in iter_layers(model)]


def _removed(block, plan: dict) -> list:
    """Units of ``block`` that ``plan`` removes, where zeroing them is what removing them does (see below)."""
    keep = plan[block.key.stack][block.key.index].get(block.key.name)
    if keep is None:
        return []
    if block.is_attention and block.spec.gate_query:
        # Autoformer averages query-key scores over all heads: zeroed queries scale that mean, removal renormalises
        return []
    if block.is_attention and block.spec.draws_rng and not keep:
        # Informer's ProbSparse draws random numbers: a zeroed module still draws, a removed one does not
        keep = [0]
    return sorted(set(range(block.units)) - set(keep))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_zeroing_the_unit_slices_equals_slicing_the_units_away(model_type, seed):
    case = CASES[model_type]
    torch.manual_seed(seed)
    dense = case.build(case.attn_implementations[0]).eval()
    plan = {key: [{} if entry.get("drop") else entry for entry in layers]  # layers: dropping is not a unit slice
            for key, layers in random_plan(dense, seed).items()}
    zeroed = copy.deepcopy(dense)
    removed = {b.key: _removed(b, plan) for b in iter_blocks(zeroed)}
    with torch.no_grad():
        for b in iter_blocks(zeroed):
            for param, dim, idx in b.unit_slices(torch.tensor(removed[b.key], dtype=torch.long)):
                param.index_fill_(dim, idx.to(param.device), 0.0)
    kept = {key: [{name: sorted(set(range(get_block(dense, (key, i, name)).units)) - set(removed[(key, i, name)]))
                   for name in entry} for i, entry in enumerate(layers)] for key, layers in plan.items()}
    sliced = hfprune.apply_plan(copy.deepcopy(dense), kept)
    with torch.no_grad():
        expected = _run(sliced, case, seed)
        assert_close(_run(zeroed, case, seed), expected)
        # not vacuous: the units removed change what the model computes
        assert any(not torch.equal(x, y) for x, y in zip(_run(dense, case, seed), expected))
    # and the slices are exactly what slicing removes: in a multi-head block, zeroing q, k and v alone already
    # silences a head, so outputs could not tell whether the output projection's columns are named
    names = {id(p): n for n, p in dense.named_parameters()}
    for b in iter_blocks(dense):
        if not removed[b.key] or get_block(sliced, b.key).is_empty():  # an emptied module loses all its weights
            continue
        named = {}
        for param, dim, idx in b.unit_slices(torch.tensor(removed[b.key], dtype=torch.long)):
            named[names[id(param)]] = (dim, param.shape[dim] - len(idx))
        changed = {names[id(p)] for m in b.projections() for p in m.parameters()
                   if sliced.get_parameter(names[id(p)]).shape != p.shape}
        assert set(named) == changed, b.key
        assert all(sliced.get_parameter(n).shape[dim] == size for n, (dim, size) in named.items()), b.key


LORA = {  # model_type -> target modules: Linear (bert, llama) and GPT-2's Conv1D, stored (in, out)
    "bert": r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
            r"|output\.dense)",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("model_type", sorted(LORA))
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_merged_weight_is_peft_s_merged_weight(model_type):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA[model_type],
                             fan_in_fan_out=model_type == "gpt2")
    model = peft.get_peft_model(CASES[model_type].build("eager"), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: the update would be nothing
                param.normal_(0.0, 0.2)
    merged = copy.deepcopy(model).merge_and_unload()
    wrapped = {b.key: b for b in iter_blocks(unwrap(model))}
    for b in iter_blocks(merged):
        lora = wrapped[b.key]
        for mine, theirs in zip(lora.projections(), b.projections()):
            assert hasattr(mine, "lora_A")  # really under an adapter
            assert torch.allclose(merged_weight(mine), weight_out_in(theirs), atol=1e-6)
    model.merge_adapter()  # an adapter already merged into the base weight counts once
    for lora in wrapped.values():
        for mine, theirs in zip(lora.projections(), get_block(merged, lora.key).projections()):
            assert torch.allclose(merged_weight(mine), weight_out_in(theirs), atol=1e-6)

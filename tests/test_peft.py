"""LoRA / DoRA-aware pruning is exact: a pruned peft model computes what the masked dense peft model computes.

peft wraps each targeted linear in a ``lora.Linear`` holding ``base_layer``, ``lora_A``/``lora_B`` and, for
DoRA, ``lora_magnitude_vector``. ``hfprune.apply_plan`` slices those wrappers in place (duck-typed in
``hfprune.core.structure``), so a pruned adapter model can be evaluated, merged, trained further and saved.

Every test uses the heterogeneous plan of ``random_plan``: layer 0 loses all heads, layer 1 all FFN neurons,
layer 2 is dropped (and the other block of layers 0 and 1 keeps a random subset).
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import transformers  # noqa: E402

import hfprune  # noqa: E402
from hfprune.core.apply import unwrap  # noqa: E402
from hfprune.core.arch import get_adapter  # noqa: E402
from hfprune.core.masking import masked  # noqa: E402
from hfprune.core.structure import EmptyAttention, get_module  # noqa: E402

from .cases import CASES, random_plan  # noqa: E402
from .test_exactness import assert_close  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer"),
]

TARGETS = {
    # BERT: "dense" alone would also hit the pooler; the regex (fullmatch) names the layer projections only.
    "bert": r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
            r"|output\.dense)",
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
ADAPTED_PER_LAYER = {"bert": 6, "llama": 7}  # every projection of every layer carries an adapter
AUTO_CLASS = {"bert": transformers.AutoModelForSequenceClassification, "llama": transformers.AutoModelForCausalLM}
MODEL_TYPES = sorted(TARGETS)
VARIANTS = ["lora", "dora"]


def _peft_model(model_type: str, variant: str, seed: int = 0, **lora_kwargs):
    """A tiny model under a LoRA/DoRA adapter whose every part matters (random B, B bias and magnitudes)."""
    torch.manual_seed(seed)
    base = CASES[model_type].build("eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[model_type],
                             use_dora=variant == "dora", **lora_kwargs)
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: the adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:  # magnitude != ||W + sBA||: DoRA rescales every row
                param.mul_(0.5 + torch.rand(param.shape, generator=g))
    assert len(_lora_layers(model)) == ADAPTED_PER_LAYER[model_type] * base.config.num_hidden_layers
    return model.eval()


def _inputs(model_type: str, seed: int = 0, labels: bool = False) -> dict:
    inputs = CASES[model_type].inputs(seed)
    if labels:
        inputs["labels"] = inputs["input_ids"].clone() if model_type == "llama" else torch.tensor([0, 2])
    return inputs


def _logits(model, model_type: str, seed: int = 0) -> list:
    with torch.no_grad():
        return [model(**_inputs(model_type, seed)).logits]


def _plan(model, seed: int = 1) -> dict:
    # seed 1 removes a whole key/value group of the GQA Llama (k/v lose rows too), seed 2 one head per group
    plan = random_plan(unwrap(model), seed)
    layers = plan["layers"]
    assert layers[0]["heads"] == [] and layers[1]["ffn"] == [] and layers[2] == {"drop": True}
    assert 0 < len(layers[0]["ffn"]) and 0 < len(layers[1]["heads"]) < 4
    return plan


def _lora_layers(model) -> list:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _stack(model):
    return get_adapter(unwrap(model)).arch_spec(unwrap(model).config).stacks["layers"]


def _spec(model):
    """(attention spec, FFN spec) of the model's layers: where q/k/v/o, up and down live."""
    stack = _stack(model)
    return stack.attention["heads"], stack.ffn["ffn"]


def _layer(model, i: int):
    return unwrap(model).base_model.get_submodule(_stack(model).layers)[i]


def _assert_adapter_shapes(model, dora: bool) -> None:
    """Every adapter agrees with its (sliced) base layer and with the wrapper's own bookkeeping."""
    for name, module in _lora_layers(model):
        base = module.base_layer
        out_f, in_f = base.weight.shape
        assert (base.out_features, base.in_features) == (out_f, in_f), name
        assert (module.out_features, module.in_features) == (out_f, in_f), name
        if base.bias is not None:
            assert base.bias.shape == (out_f,), name
        for adapter, lora_a in module.lora_A.items():
            lora_b = module.lora_B[adapter]
            assert lora_a.weight.shape == (lora_a.out_features, in_f) and lora_a.in_features == in_f, name
            assert lora_b.weight.shape == (out_f, lora_a.out_features) and lora_b.out_features == out_f, name
            if lora_b.bias is not None:
                assert lora_b.bias.shape == (out_f,), name
        for mag in module.lora_magnitude_vector.values():
            assert mag.weight.shape == (out_f,) and torch.isfinite(mag.weight).all(), name
        if dora:  # DoRA survives wherever an input column does; a zero-input layer is plain LoRA (_dora_to_lora)
            assert (in_f == 0) == (not module.lora_magnitude_vector) == (not module.lora_variant), name


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("plan_seed", [1, 2])
def test_pruned_peft_equals_masked_peft(model_type, variant, mode, plan_seed):
    model = _peft_model(model_type, variant)
    model.train(mode == "train")
    plan = _plan(model, plan_seed)
    with masked(model, plan):
        expected = _logits(model, model_type)
        with model.disable_adapter():
            expected_base = _logits(model, model_type)
    pruned = hfprune.apply_plan(copy.deepcopy(model), plan)
    assert isinstance(pruned, peft.PeftModel)
    assert_close(_logits(pruned, model_type), expected)
    with pruned.disable_adapter():  # the sliced base under the wrappers is exact on its own too
        assert_close(_logits(pruned, model_type), expected_base)
    _assert_adapter_shapes(pruned, dora=variant == "dora")
    if variant == "dora":
        assert any(len(m.lora_magnitude_vector) for _, m in _lora_layers(pruned))

    # not vacuous: the plan and the adapter both change the outputs, and slicing really removed weights
    assert not torch.allclose(_logits(model, model_type)[0], expected[0], atol=1e-4)
    assert not torch.allclose(expected_base[0], expected[0], atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert len(_lora_layers(pruned)) < len(_lora_layers(model))  # q/k/v/o of a headless block went with it


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unload_commutes_with_pruning(model_type, variant):
    model = _peft_model(model_type, variant)
    plan = _plan(model)
    with masked(model, plan):
        expected = _logits(model, model_type)

    prune_then_merge = hfprune.apply_plan(copy.deepcopy(model), plan).merge_and_unload()
    merge_then_prune = hfprune.apply_plan(copy.deepcopy(model).merge_and_unload(), plan)
    assert not _lora_layers(prune_then_merge) and not _lora_layers(merge_then_prune)
    assert type(prune_then_merge) is type(merge_then_prune)
    assert prune_then_merge.hfprune_heterogeneous and merge_then_prune.hfprune_heterogeneous
    assert prune_then_merge.config.to_dict() == merge_then_prune.config.to_dict()
    a, b = prune_then_merge.state_dict(), merge_then_prune.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert_close([a[key]], [b[key]])
    assert_close(_logits(prune_then_merge, model_type), _logits(merge_then_prune, model_type))
    assert_close(_logits(prune_then_merge, model_type), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_peft_trains(model_type, variant):
    model = _peft_model(model_type, variant)
    plan = _plan(model)
    pruned = hfprune.apply_plan(copy.deepcopy(model), plan).train()
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    trainable = [n for n, p in pruned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base (incl. placeholder biases) stays frozen

    opt = torch.optim.SGD([p for p in pruned.parameters() if p.requires_grad], lr=0.1)
    loss = pruned(**_inputs(model_type, labels=True)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in pruned.parameters() if p.grad is not None)
    opt.step()
    for n, p in pruned.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, before[n]), n
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[n]), n
    changed = {n for n, p in pruned.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in changed)

    if variant == "lora":
        # plain LoRA: the same SGD step on the masked dense model lands on the same function, because masked
        # rows and columns get exactly zero gradient. (DoRA's rescaled magnitudes reparametrise the step.)
        dense = copy.deepcopy(model).train()
        dense_opt = torch.optim.SGD([p for p in dense.parameters() if p.requires_grad], lr=0.1)
        with masked(dense, plan):
            dense_loss = dense(**_inputs(model_type, labels=True)).loss
            dense_loss.backward()
            dense_opt.step()
            expected = _logits(dense, model_type, seed=1)
        assert_close([loss.detach()], [dense_loss.detach()])
        assert_close(_logits(pruned, model_type, seed=1), expected)


def _capture(module, store: list):
    return module.register_forward_hook(lambda _m, _args, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_removed_blocks_leave_exactly_their_bias(model_type, variant):
    """A headless attention block / neuronless FFN adds its output projection's bias; LoRA(0) and DoRA(0) add
    nothing, so the placeholders need no adapter state, and a zero-input DoRA layer turns into plain LoRA."""
    model = _peft_model(model_type, variant)
    attn, ffn = _spec(model)
    plan = _plan(model)
    pruned = hfprune.apply_plan(copy.deepcopy(model), plan)
    layer0, layer1 = _layer(model, 0), _layer(model, 1)
    o0, down1 = get_module(layer0, attn.o), get_module(layer1, ffn.down)

    masked_o, masked_down = [], []
    handles = [_capture(o0, masked_o), _capture(down1, masked_down)]
    with masked(model, plan):
        _logits(model, model_type)
    for h in handles:
        h.remove()
    for out, proj in ((masked_o[0], o0), (masked_down[0], down1)):
        bias = proj.base_layer.bias
        assert_close([out], [torch.zeros_like(out) if bias is None else bias.expand_as(out)], atol=1e-6)

    # headless block: a placeholder replaces the attention module, holding the base o-projection bias
    empty = get_module(_layer(pruned, 0), attn.module)
    assert isinstance(empty, EmptyAttention)
    assert not _lora_layers(empty)
    if attn.empty == "bias":  # Llama: o_proj lives inside the replaced module
        assert torch.equal(empty.bias, o0.base_layer.bias) and not empty.bias.requires_grad
    sliced_zero_input = [get_module(_layer(pruned, 1), ffn.down)]
    if attn.empty == "context":  # BERT: attention.output.dense stays, sliced to zero input columns
        sliced_zero_input.append(get_module(_layer(pruned, 0), attn.o))
    for proj in sliced_zero_input:
        assert proj.in_features == 0 and proj.lora_A["default"].weight.shape == (4, 0)
        assert not proj.lora_magnitude_vector and "default" not in proj.lora_variant
        assert not proj.use_dora["default"]
    assert_close(_logits(pruned, model_type), _masked_logits(model, plan, model_type))


def _masked_logits(model, plan, model_type):
    with masked(model, plan):
        return _logits(model, model_type)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_bias_folds_into_placeholders(model_type):
    """peft's ``lora_bias=True`` gives B a bias: a headless block then adds base bias + scaling * B.bias.
    (Llama's MLP projections have no base bias: peft only warns, and a neuronless FFN adds scaling * B.bias.)"""
    model = _peft_model(model_type, "lora", lora_bias=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    plan = _plan(model)
    pruned = hfprune.apply_plan(copy.deepcopy(model), plan)
    _assert_adapter_shapes(pruned, dora=False)
    assert_close(_logits(pruned, model_type), _masked_logits(model, plan, model_type))
    attn, _ = _spec(model)
    if attn.empty == "bias":  # Llama: the placeholder holds base bias + scaling * B.bias of o_proj
        o0 = get_module(_layer(model, 0), attn.o)
        folded = o0.base_layer.bias + o0.scaling["default"] * o0.lora_B["default"].bias
        assert_close([get_module(_layer(pruned, 0), attn.module).bias], [folded], atol=1e-6)
    if model_type == "bert":  # peft cannot merge a B bias into Llama's bias-free MLP projections
        merged = hfprune.apply_plan(copy.deepcopy(model).merge_and_unload(), plan)
        assert_close(_logits(pruned.merge_and_unload(), model_type), _logits(merged, model_type))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_adapters(model_type, variant):
    """Merged plain LoRA slices consistently (and unmerges exactly); merged DoRA is refused, untouched."""
    model = _peft_model(model_type, variant)
    plan = _plan(model)
    expected = _masked_logits(model, plan, model_type)
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    if variant == "dora":
        shapes = {n: p.shape for n, p in merged.named_parameters()}
        with pytest.raises(ValueError, match="unmerge_adapter"):
            hfprune.apply_plan(merged, plan)
        assert {n: p.shape for n, p in merged.named_parameters()} == shapes
        return
    hfprune.apply_plan(merged, plan)
    assert_close(_logits(merged, model_type), expected)
    merged.unmerge_adapter()
    assert_close(_logits(merged, model_type), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_merged_model_saves_and_reloads(model_type, variant, tmp_path):
    model = _peft_model(model_type, variant)
    plan = _plan(model)
    merged = hfprune.apply_plan(copy.deepcopy(model), plan).merge_and_unload()
    expected = _logits(merged, model_type)
    merged.save_pretrained(tmp_path / "ckpt")
    reloaded = AUTO_CLASS[model_type].from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    # the checkpoint's own modeling code rebuilt it (its class keeps the stock name, so pipelines accept it)
    assert type(reloaded).__module__.startswith("transformers_modules.")
    assert type(reloaded).__name__ == type(merged).__name__.removeprefix("Hfpruned")
    assert not any("lora" in k for k in reloaded.state_dict())
    assert_close(_logits(reloaded, model_type), expected)

"""Hidden-size pruning: the sliced model equals its reference, exactly the dense model when the removed channels are
dead (RMSNorm families), reloads (plain for the Llama family), composes, and costs what it leaves.

The reference (hfprune.core.hidden): the dense model whose removed channels are zero everywhere (embedding columns,
the rows and biases of every projection writing the residual stream) and whose norms compute their statistics over
the kept channels only. For RMSNorm that is the stock norm itself (the slicing folds sqrt(H/k) into the weights and
H/k into epsilon), so the reference here is just the zeroed dense model; LayerNorms are patched to normalise over
the kept channels (and output zero elsewhere).
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch.nn import functional as F

import hfprune
from hfprune.core.arch import get_adapter
from hfprune.core.blocks import weight_out_in
from hfprune.core.cost import estimate
from hfprune.core.hidden import hidden_size, supports_hidden
from hfprune.core.masking import masked
from hfprune.core.plan import PlanError, PrunePlan
from hfprune.core.structure import base_layer, hidden_sites

from .cases import CASES, random_plan

HIDDEN_TYPES = sorted(t for t, c in CASES.items() if supports_hidden(c.build("eager")))
PARAMS = [(t, attn) for t in HIDDEN_TYPES for attn in CASES[t].attn_implementations]
PLAIN_TYPES = [t for t in HIDDEN_TYPES if get_adapter(CASES[t].build("eager").config).hidden_fields is not None]


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def run(model, model_type: str, seed: int = 0) -> list:
    case = CASES[model_type]
    with torch.no_grad():
        return _flat(case.outputs(model(**case.inputs(seed))))


def assert_close(a: list, b: list, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def keep_channels(model, seed: int, fraction: float = 0.75, multiple: int = 1) -> list:
    size = hidden_size(model)
    k = int(size * fraction) // multiple * multiple
    return sorted(random.Random(seed).sample(range(size), k))


def heads_multiple(model) -> int:
    """What a plain checkpoint's kept hidden size must be a multiple of (LlamaConfig checks it)."""
    return getattr(model.config, "num_attention_heads", 1) if model.config.model_type in PLAIN_TYPES else 1


def zero_channels(model, keep: list) -> None:
    """Zero the channels outside ``keep`` in the embeddings and in every projection writing the stream."""
    sites = hidden_sites(model, get_adapter(model).arch_spec(model.config))
    removed = torch.tensor(sorted(set(range(hidden_size(model))) - set(keep)), dtype=torch.long)
    with torch.no_grad():
        for m in sites["embeddings"]:
            m.weight[:, removed] = 0
        for m in sites["writers"]:
            weight_out_in(m)[removed] = 0
            if base_layer(m).bias is not None:
                base_layer(m).bias[removed] = 0
        for m in sites["empty"]:
            if getattr(m, "bias", None) is not None and getattr(m, "kind", "bias") != "context":
                m.bias[removed] = 0


def reference(dense, keep: list):
    """The reference a model sliced to ``keep`` must equal (module docstring)."""
    ref = copy.deepcopy(dense)
    spec = get_adapter(ref).arch_spec(ref.config)
    zero_channels(ref, keep)
    norms = hidden_sites(ref, spec)["norms"]
    size, k = hidden_size(ref), len(keep)
    if spec.hidden.rms:
        if spec.hidden.eps_attr is None:  # Qwen3 keeps its epsilon: eps * k / H in terms of the dense norm
            for n in norms:
                n.variance_epsilon *= k / size
        return ref
    idx = torch.tensor(keep)
    for n in norms:
        def forward(x, n=n):  # LayerNorm statistics over the kept channels; the removed ones stay zero
            y = torch.zeros_like(x)
            y[..., idx] = F.layer_norm(x[..., idx], (k,), n.weight[idx], n.bias[idx], n.eps)
            return y
        n.forward = forward
    return ref


@pytest.mark.parametrize("model_type,attn", PARAMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_reference(model_type, attn, seed):
    torch.manual_seed(seed)
    dense = CASES[model_type].build(attn).eval()
    keep = keep_channels(dense, seed)
    expected = run(reference(dense, keep), model_type, seed)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    assert_close(run(sliced, model_type, seed), expected)
    assert hidden_size(sliced) == len(keep)
    assert any(not torch.equal(x, y) for x, y in zip(run(dense, model_type, seed), expected))  # not vacuous
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("model_type", HIDDEN_TYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_with_heads_ffn_and_layers(model_type, mode):
    """Hidden channels together with a heterogeneous plan (emptied blocks, a dropped layer): the reference is
    also masked in heads and neurons."""
    torch.manual_seed(3)
    dense = CASES[model_type].build("eager")
    dense.train(mode == "train")
    plan = {**random_plan(dense, 3), "hidden": keep_channels(dense, 3)}
    ref = reference(dense, plan["hidden"])
    with masked(ref, {k: v for k, v in plan.items() if k != "hidden"}):
        expected = run(ref, model_type, 3)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    assert_close(run(sliced, model_type, 3), expected)
    assert sum(p.numel() for p in sliced.parameters()) == estimate(dense, plan).params


@pytest.mark.parametrize("model_type", [t for t in HIDDEN_TYPES if t in PLAIN_TYPES])
def test_dead_channels_are_exact_against_the_dense_model(model_type):
    """Channels zero in the embeddings and in every writer: removing them changes nothing (RMSNorm fold)."""
    torch.manual_seed(0)
    dense = CASES[model_type].build("eager").eval()
    keep = keep_channels(dense, 0, 0.5)
    zero_channels(dense, keep)  # the dense model itself now has dead channels
    if get_adapter(dense).arch_spec(dense.config).hidden.eps_attr is None:
        for m in dense.modules():  # Qwen3 keeps epsilon (its q/k norms share it): exact up to it, so take it 0
            if hasattr(m, "variance_epsilon"):
                m.variance_epsilon = 0.0
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    assert_close(run(sliced, model_type), run(dense, model_type))


def test_layernorm_dead_channels_are_not_exact():
    """What holds for LayerNorm: dead channels shift the mean and come out of the norm non-zero, so slicing them
    away changes the output (it equals the reference with statistics over the kept channels instead)."""
    torch.manual_seed(0)
    dense = CASES["gpt2"].build("eager").eval()
    keep = keep_channels(dense, 0, 0.5)
    zero_channels(dense, keep)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    assert (run(sliced, "gpt2")[0] - run(dense, "gpt2")[0]).abs().max() > 1e-3
    assert_close(run(sliced, "gpt2"), run(reference(dense, keep), "gpt2"))


@pytest.mark.parametrize("model_type", HIDDEN_TYPES)
def test_reload(model_type, tmp_path):
    """Hidden size alone: a plain checkpoint for the Llama family (stock from_pretrained, no code, config
    hidden_size), remote code for families that derive their head size from it; hfprune's loader for both."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    dense = CASES[model_type].build("eager").eval()
    keep = keep_channels(dense, 0, multiple=heads_multiple(dense))
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    sliced.save_pretrained(tmp_path)
    expected = run(sliced, model_type)
    plain = model_type in PLAIN_TYPES
    assert (tmp_path / "modeling_hfprune.py").exists() != plain
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("hfprune" in config) != plain
    assert json.loads((tmp_path / "prune_plan.json").read_text())["hidden"] == keep
    stock = next(c for c in type(sliced).__mro__ if c.__module__.startswith("transformers.models."))
    if plain:
        assert config["hidden_size"] == len(keep)
        reloaded = stock.from_pretrained(tmp_path).eval()
        assert type(reloaded).__module__.startswith("transformers.")
    else:
        auto = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
        assert auto.to_dict()["hfprune"]["plan"]["hidden"] == keep
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto_cls = AutoModelForCausalLM if "LMHead" in stock.__name__ else AutoModelForSequenceClassification
        reloaded = auto_cls.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert_close(run(reloaded, model_type), expected, atol=1e-6)  # the stock class may pick another attention
    ours = hfprune.from_pretrained(tmp_path).eval()
    assert_close(run(ours, model_type), expected, atol=1e-6)
    assert ours.hfprune_plan.hidden == tuple(keep)


@pytest.mark.parametrize("model_type", HIDDEN_TYPES)
def test_heterogeneous_reload(model_type, tmp_path):
    torch.manual_seed(1)
    dense = CASES[model_type].build("eager").eval()
    plan = {**random_plan(dense, 1), "hidden": keep_channels(dense, 1)}
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    assert sliced.hfprune_heterogeneous
    sliced.save_pretrained(tmp_path)
    expected = run(sliced, model_type)
    ours = hfprune.from_pretrained(tmp_path).eval()
    assert_close(run(ours, model_type), expected, atol=1e-6)
    assert ours.hfprune_plan.hidden == tuple(plan["hidden"])
    assert ours.hfprune_plan.dense["hidden"] == hidden_size(dense)


def test_tied_head_stays_tied(tmp_path):
    torch.manual_seed(0)
    dense = CASES["llama"].build("eager")
    dense.config.tie_word_embeddings = True
    dense.tie_weights()
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    keep = keep_channels(dense, 0, multiple=4)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight
    assert sliced.lm_head.in_features == len(keep)
    assert estimate(dense, {"hidden": keep, "layers": [{}] * 3}).params == sum(p.numel() for p in sliced.parameters())
    sliced.save_pretrained(tmp_path)
    reloaded = type(dense).from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_plain_then_heterogeneous_composes(tmp_path):
    """A plain hidden-pruned Llama pruned again per layer: the record restates the dense config (hidden size and
    unfolded epsilon) and composes the hidden indices."""
    torch.manual_seed(2)
    dense = CASES["llama"].build("eager").eval()
    first = keep_channels(dense, 2, 0.75, multiple=4)
    model = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": first, "layers": [{}] * 3})
    assert not model.hfprune_heterogeneous and model.config.hidden_size == 24
    second = sorted(random.Random(5).sample(range(24), 18))
    hfprune.apply_plan(model, {"hidden": second, "layers": [{"heads": [0, 1]}, {}, {"drop": True}]})
    assert model.hfprune_heterogeneous
    assert model.hfprune_plan.hidden == tuple(first[i] for i in second)
    assert model.config.hidden_size == 32
    assert model.config.rms_norm_eps == pytest.approx(dense.config.rms_norm_eps)
    ref = reference(dense, list(model.hfprune_plan.hidden))
    with masked(ref, {"layers": [{"heads": [0, 1]}, {}, {"drop": True}]}):
        expected = run(ref, "llama")
    assert_close(run(model, "llama"), expected)
    model.save_pretrained(tmp_path)
    assert_close(run(hfprune.from_pretrained(tmp_path).eval(), "llama"), run(model, "llama"), atol=1e-6)


def test_generation_with_kv_cache():
    torch.manual_seed(0)
    dense = CASES["llama"].build("sdpa").eval()
    keep = keep_channels(dense, 0)
    ids = CASES["llama"].inputs(0)["input_ids"][:1]
    expected = reference(dense, keep).generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), {"hidden": keep, "layers": [{}] * 3})
    assert torch.equal(sliced.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True), expected)


# ---- the plan -------------------------------------------------------------------------------------------------


def test_plan_json():
    plan = PrunePlan.from_dict({"hidden": [3, 0, 7], "layers": [{}, {"ffn": [1]}]})
    assert plan.hidden == (0, 3, 7)
    assert plan.to_dict()["hidden"] == [0, 3, 7]
    assert PrunePlan.from_json(plan.to_json()) == plan
    assert not plan.is_empty()
    for keeps_all in ({"layers": [{}]}, {"hidden": None, "layers": [{}]}):
        parsed = PrunePlan.from_dict(keeps_all)
        assert parsed.hidden is None and "hidden" not in parsed.to_dict() and parsed.is_empty()
    dense = plan.with_dense({"hidden": 8, "layers": [{"ffn": (4,)}, {"ffn": (4,)}]})
    assert PrunePlan.from_dict(dense.to_dict()).dense["hidden"] == 8


@pytest.mark.parametrize("bad,message", [
    ({"hidden": [], "layers": [{}]}, "at least one hidden channel"),
    ({"hidden": [1, 1], "layers": [{}]}, "appears twice"),
    ({"hidden": [-1], "layers": [{}]}, ">= 0"),
    ({"hidden": "all", "layers": [{}]}, "list of kept indices"),
    ({"hidden": [0.5], "layers": [{}]}, "integers"),
    ({"hidden": [0], "layers": [{}], "dense": {"hidden": 0, "layers": [{}]}}, "dense hidden size"),
])
def test_plan_refuses(bad, message):
    with pytest.raises(PlanError, match=message):
        PrunePlan.from_dict(bad)


@pytest.mark.parametrize("model_type,plan,message", [
    ("llama", {"hidden": [0, 32], "layers": [{}] * 3}, "index 32 out of range"),
    ("vit", {"hidden": [0, 1], "layers": [{}] * 3}, "cannot prune the hidden size"),
])
def test_bad_hidden_plan_leaves_the_model(model_type, plan, message):
    torch.manual_seed(0)
    model = CASES[model_type].build("eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        hfprune.apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compose_hidden():
    from hfprune.core.apply import compose

    first = PrunePlan.from_dict({"hidden": [1, 3, 5, 7], "layers": [{}]})
    assert compose(first, PrunePlan.from_dict({"hidden": [0, 2], "layers": [{}]})).hidden == (1, 5)
    assert compose(first, PrunePlan.from_dict({"layers": [{}]})).hidden == (1, 3, 5, 7)
    assert compose(PrunePlan.from_dict({"layers": [{}]}), first).hidden == (1, 3, 5, 7)


# ---- one shot ---------------------------------------------------------------------------------------------------


def _calibration(model_type: str) -> list:
    batch = CASES[model_type].inputs(0)
    if model_type in PLAIN_TYPES or model_type == "gpt2":
        return [{**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}]
    return [{**batch, "labels": torch.tensor([0, 2])}]


@pytest.mark.parametrize("criterion", ["activation", "fisher", "magnitude", "random"])
@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
def test_prune_hidden_to_a_budget(criterion, model_type):
    torch.manual_seed(0)
    model = CASES[model_type].build("eager").eval()
    dense_params = sum(p.numel() for p in model.parameters())
    config = hfprune.PruningConfig(target="hidden", criterion=criterion, params_ratio=0.8)
    result = hfprune.prune(model, _calibration(model_type), config)
    assert result.after.params == sum(p.numel() for p in model.parameters()) <= 0.8 * dense_params
    assert len(result.plan.hidden) == hidden_size(model) and result.scores["hidden"].shape == (32,)
    assert len(result.plan.hidden) % heads_multiple(model) == 0
    assert model.hfprune_heterogeneous == (model_type not in PLAIN_TYPES)
    # the best-scored channels are the ones kept
    kept = set(result.plan.hidden)
    scores = result.scores["hidden"]
    assert min(scores[list(kept)]) >= max(scores[[c for c in range(32) if c not in kept]])


def test_prune_hidden_ratio_and_macs():
    torch.manual_seed(0)
    model = CASES["qwen2"].build("eager").eval()
    result = hfprune.prune(model, None, hfprune.PruningConfig(target="hidden", criterion="magnitude",
                                                              hidden_ratio=0.5))
    assert model.config.hidden_size == 16 and len(result.plan.hidden) == 16
    model = CASES["gpt2"].build("eager").eval()
    config = hfprune.PruningConfig(target="hidden", criterion="random", macs_ratio=0.6, seq_len=8, round_to=4)
    result = hfprune.prune(model, None, config)
    assert result.after.macs <= 0.6 * result.before.macs and len(result.plan.hidden) % 4 == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "hidden", "criterion": "taylor", "params_ratio": 0.8}, "cannot score hidden channels"),
    ({"target": "hidden", "criterion": "activation", "head_ratio": 0.8}, "exactly one budget"),
    ({"target": "hidden", "criterion": "activation", "params_ratio": 0.8, "hidden_ratio": 0.5}, "exactly one"),
    ({"criterion": "activation", "hidden_ratio": 0.5}, "set target='hidden'"),
    ({"target": "hidden", "criterion": "fisher", "params_ratio": 0.8, "recovery": "obs"}, "no recovery"),
    ({"target": "width", "criterion": "fisher", "params_ratio": 0.8}, "target="),
    ({"target": "hidden", "criterion": "fisher", "hidden_ratio": 1.5}, r"\(0, 1\]"),
])
def test_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hfprune.PruningConfig(**kwargs)


def test_callback_refuses_hidden():
    with pytest.raises(ValueError, match="one shot"):
        hfprune.PruningCallback(hfprune.PruningConfig(target="hidden", criterion="fisher", params_ratio=0.8))


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_prunes_with_its_base(use_dora):
    """A LoRA/DoRA-wrapped Llama pruned in hidden size, then merged, equals the merged model pruned."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    dense = CASES["llama"].build("eager").eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    wrapped = peft.get_peft_model(dense, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would change nothing
                p.normal_(0, 0.1)
    keep = keep_channels(dense, 0)
    plan = {"hidden": keep, "layers": [{}] * 3}
    merged_then_pruned = hfprune.apply_plan(copy.deepcopy(wrapped).merge_and_unload(), plan)
    hfprune.apply_plan(wrapped, plan)
    assert_close(run(wrapped.merge_and_unload(), "llama"), run(merged_then_pruned, "llama"))


def test_masks_refuse_hidden():
    model = CASES["llama"].build("eager")
    with pytest.raises(ValueError, match="only sliced"):
        with masked(model, {"hidden": [0, 1], "layers": [{}] * 3}):
            pass

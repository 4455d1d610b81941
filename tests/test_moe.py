"""Mixture-of-experts pruning (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss): removing routed experts equals
setting their router logits to minus infinity, exactly; neurons inside experts; plain and per-layer checkpoints;
the expert criteria; refusals before anything changes."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import hfprune
from hfprune.core import cost
from hfprune.core.apply import model_dims
from hfprune.core.arch import get_adapter
from hfprune.core.masking import masked
from hfprune.core.plan import PlanError
from hfprune.core.structure import ArchSpec
from hfprune.pruning.importance import get_importance

from .cases_moe import MOE_CASES

TYPES = sorted(MOE_CASES)
NEURONS = {t for t in TYPES if t != "gpt_oss"}  # gpt-oss: whole experts only


def _router(layer):
    return layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate


def _minus_infinity(model, removed: dict) -> list:
    """Forward hooks that route each layer as its router would with the removed experts' logits at -inf: the
    reference, written here from the transformers routers' code, independent of hfprune's masks."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        if not removed.get(i):
            continue

        def hook(module, _args, output, gone=removed[i]):
            logits = output[0].clone()
            logits[:, gone] = float("-inf")
            if type(module).__name__.startswith("GptOss"):  # top-k logits, then their softmax
                values, index = torch.topk(logits, module.top_k, dim=-1)
                return output[0], torch.softmax(values, dim=1, dtype=values.dtype), index
            values, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), module.top_k, dim=-1)
            if getattr(module, "norm_topk_prob", type(module).__name__.startswith("Mixtral")):
                values = values / values.sum(dim=-1, keepdim=True)
            return output[0], values.to(output[1].dtype), index

        handles.append(_router(layer).register_forward_hook(hook))
    return handles


def _expert_plan(seed: int, n_experts: int = 6) -> dict:
    rng = random.Random(seed)
    return {"layers": [{"experts": sorted(rng.sample(range(n_experts), rng.randint(2, n_experts - 1)))}
                       for _ in range(3)]}


def _run(model, case, seed: int = 0):
    with torch.no_grad():
        return model(**case.inputs(seed)).logits


def _neurons(experts: list, per: int, seed: int, width: int = 24) -> list:
    rng = random.Random(seed)
    return sorted(e * width + j for e in experts for j in rng.sample(range(width), per))


@pytest.mark.parametrize("model_type,attn", [(t, a) for t in TYPES for a in MOE_CASES[t].attn_implementations])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1])
def test_removing_experts_equals_minus_infinity_router_logits(model_type, attn, mode, seed):
    case = MOE_CASES[model_type]
    torch.manual_seed(seed)
    dense = case.build(attn).train(mode == "train")
    plan = _expert_plan(seed)
    removed = {i: [e for e in range(6) if e not in layer["experts"]] for i, layer in enumerate(plan["layers"])}
    handles = _minus_infinity(dense, removed)
    expected = _run(dense, case, seed)
    for h in handles:
        h.remove()
    assert not torch.equal(_run(dense, case, seed), expected)  # not vacuous: the removed experts mattered
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan).train(mode == "train")
    assert torch.equal(_run(sliced, case, seed), expected)  # exact, not close
    with masked(dense, plan):  # hfprune's own masks (router gates) agree
        assert torch.equal(_run(dense, case, seed), expected)
    layer0 = sliced.model.layers[0]
    assert _router(layer0).weight.shape[0] == len(plan["layers"][0]["experts"])
    assert layer0.mlp.experts.num_experts == len(plan["layers"][0]["experts"])


def _mixed_plan(model, seed: int) -> dict:
    """Experts, neurons inside experts, heads, the shared expert and a dropped layer, all at once."""
    rng = random.Random(seed)
    dims = model_dims(model)["layers"]
    experts = sorted(rng.sample(range(6), 4))
    first = {"experts": experts}
    if "expert_ffn" in dims[0]:
        first["expert_ffn"] = _neurons(experts, 8, seed)
    second = {"experts": sorted(rng.sample(range(6), 3))}
    if "heads" in dims[1]:
        second["heads"] = [0, 1]  # one key/value group
    if "shared_ffn" in dims[1]:
        second["shared_ffn"] = sorted(rng.sample(range(40), 17))
    if "expert_ffn" in dims[1]:
        second["expert_ffn"] = _neurons(range(6), 16, seed + 1)
    return {"layers": [first, second, {"drop": True}]}


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sliced_equals_masked_with_every_block(model_type, mode):
    case = MOE_CASES[model_type]
    torch.manual_seed(3)
    dense = case.build("eager").train(mode == "train")
    plan = _mixed_plan(dense, 3)
    with masked(dense, plan):
        expected = _run(dense, case)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan).train(mode == "train")
    got = _run(sliced, case)
    assert (got - expected).abs().max() <= 1e-6  # neurons: sums over fewer terms, so close rather than equal
    assert sum(p.numel() for p in sliced.parameters()) == cost.estimate(dense, plan).params
    predicted, measured = cost.estimate(dense, plan), cost.estimate(sliced)  # per layer: params, MACs, units
    assert [(c.params, c.macs, c.heads, c.neurons) for c in predicted.layers] == \
        [(c.params, c.macs, c.heads, c.neurons) for c in measured.layers]


@pytest.mark.parametrize("model_type", TYPES)
def test_generation_with_kv_cache(model_type):
    case = MOE_CASES[model_type]
    torch.manual_seed(0)
    dense = case.build(case.attn_implementations[-1]).eval()
    plan = _mixed_plan(dense, 0)
    ids = case.inputs(0)["input_ids"][:1]
    with masked(dense, plan):
        expected = dense.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    assert torch.equal(sliced.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True), expected)


def _uniform_plan(model_type: str) -> dict:
    keep = [[0, 2, 3, 5], [1, 2, 4, 5], [0, 1, 2, 3]]
    layers = [{"experts": k} for k in keep]
    if model_type in NEURONS:
        for i, layer in enumerate(layers):
            layer["expert_ffn"] = _neurons(layer["experts"], 16, i)
    return {"layers": layers}


@pytest.mark.parametrize("model_type", TYPES)
def test_uniform_experts_save_a_plain_checkpoint(model_type, tmp_path):
    case = MOE_CASES[model_type]
    torch.manual_seed(0)
    model = hfprune.apply_plan(case.build("eager").eval(), _uniform_plan(model_type))
    assert not model.hfprune_heterogeneous
    expected = _run(model, case)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "hfprune" not in config and "auto_map" not in config and not (tmp_path / "modeling_hfprune.py").exists()
    assert config.get("num_local_experts", config.get("num_experts")) == 4
    for loaded in (T.AutoModelForCausalLM.from_pretrained(tmp_path), hfprune.from_pretrained(tmp_path)):
        # transformers re-fuses the experts on load; its grouped_mm kernel then differs in the last bits
        assert (_run(loaded.eval(), case) - expected).abs().max() <= 1e-6
    assert hfprune.from_pretrained(tmp_path).hfprune_plan == model.hfprune_plan
    inputs = {**case.inputs(0), "output_router_logits": True}  # the auxiliary loss counts the kept experts
    with torch.no_grad():
        aux = [m(**inputs, labels=inputs["input_ids"]).aux_loss
               for m in (model, T.AutoModelForCausalLM.from_pretrained(tmp_path).eval())]
    assert torch.allclose(aux[0], aux[1], atol=1e-6)


CHILD = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hfprune" or name.startswith("hfprune."):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import torch, transformers
from safetensors.torch import load_file, save_file
out = {}
for name, directory in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = model(**load_file(directory + "/inputs.safetensors")).logits
save_file(out, sys.argv[2])
"""


def test_per_layer_checkpoints_reload_without_hfprune(tmp_path):
    jobs, expected = {}, {}
    for model_type in TYPES:
        case = MOE_CASES[model_type]
        torch.manual_seed(1)
        model = hfprune.apply_plan(case.build("eager").eval(), _mixed_plan(case.build("eager"), 1))
        assert model.hfprune_heterogeneous
        directory = tmp_path / model_type
        model.save_pretrained(directory)
        code = (directory / "modeling_hfprune.py").read_text()
        assert "import hfprune" not in code and "from hfprune" not in code
        save_file(case.inputs(0), directory / "inputs.safetensors")
        expected[model_type] = _run(model, case)
        reloaded = hfprune.from_pretrained(directory).eval()  # the installed code, none from the checkpoint
        assert (_run(reloaded, case) - expected[model_type]).abs().max() <= 1e-6
        jobs[model_type] = str(directory)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(jobs), str(tmp_path / "out.safetensors")],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    got = load_file(tmp_path / "out.safetensors")
    for model_type, want in expected.items():
        assert (got[model_type] - want).abs().max() <= 1e-6, model_type


@pytest.mark.parametrize("model_type", sorted(NEURONS))
def test_pruning_twice_equals_the_combined_plan(model_type):
    case = MOE_CASES[model_type]
    torch.manual_seed(2)
    dense = case.build("eager").eval()
    first = {"layers": [{"experts": [0, 2, 3, 5], "expert_ffn": _neurons(range(6), 16, 0)},
                        {"expert_ffn": _neurons(range(6), 16, 1)}, {"experts": [1, 2, 3]}]}
    second = {"layers": [{"experts": [1, 2, 3], "expert_ffn": _neurons(range(4), 8, 2, width=16)},
                         {"experts": [0, 5]}, {"expert_ffn": _neurons(range(3), 8, 3)}]}
    twice = hfprune.apply_plan(hfprune.apply_plan(copy.deepcopy(dense), first), second)
    total = twice.hfprune_plan.to_dict()
    once = hfprune.apply_plan(copy.deepcopy(dense), {"layers": total["layers"]})
    assert torch.equal(_run(twice, case), _run(once, case))
    with masked(dense, {"layers": total["layers"]}):
        assert (_run(dense, case) - _run(twice, case)).abs().max() <= 1e-6


def test_refusals_name_the_layer_and_change_nothing():
    case = MOE_CASES["mixtral"]
    model = case.build("eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {
        "fewer than the router's top-k": {"layers": [{"experts": [3]}, {}, {}]},
        "at least one expert": {"layers": [{}, {"experts": []}, {}]},
        "same number of neurons": {"layers": [{}, {}, {"expert_ffn": list(range(8)) + list(range(24, 40))}]},
        "positive multiple of 8": {"layers": [{"expert_ffn": _neurons(range(6), 5, 0)}, {}, {}]},
        "out of range": {"layers": [{"experts": [0, 6]}, {}, {}]},
    }
    for message, plan in bad.items():
        with pytest.raises(PlanError, match=message):
            hfprune.apply_plan(model, plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(PlanError, match="has no 'expert_ffn' block"):
        hfprune.apply_plan(MOE_CASES["gpt_oss"].build("eager"), {"layers": [{"expert_ffn": [0]}, {}, {}]})
    config = T.Qwen2MoeConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_experts=4, moe_intermediate_size=8, mlp_only_layers=[1])
    with pytest.raises(ValueError, match="mlp_only_layers"):
        hfprune.apply_plan(T.Qwen2MoeForCausalLM(config), {"layers": [{}, {}]})


def _calibration(case) -> list:
    return [case.inputs(seed) for seed in range(3)]


@pytest.mark.parametrize("model_type", TYPES)
def test_expert_criteria(model_type):
    case = MOE_CASES[model_type]
    torch.manual_seed(0)
    model = case.build("eager").eval()
    data = _calibration(case)
    assert get_importance("frequency").experts_only and get_importance("reap").experts_only
    freq = get_importance("frequency").score(model, data)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    for i, layer in enumerate(model.model.layers):  # shares of the top-k picks: they sum to top-k
        assert torch.allclose(freq[("layers", i, "experts")].sum(), torch.tensor(2.0))
        seen: list = []
        handle = _router(layer).register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[2]))
        with torch.no_grad():
            for b in data:
                mask = b["attention_mask"].reshape(-1).bool()
                model(**b)
                seen[-1] = seen[-1][mask]
        handle.remove()
        counts = torch.bincount(torch.cat(seen).reshape(-1), minlength=6).float() / tokens
        assert torch.allclose(freq[("layers", i, "experts")], counts)
    with torch.no_grad():  # an expert that outputs nothing scores 0 under REAP, the others more
        experts = model.model.layers[1].mlp.experts
        experts.down_proj[4].zero_()
        if hasattr(experts, "down_proj_bias"):
            experts.down_proj_bias[4].zero_()
    magnitude = get_importance("magnitude").score(model)  # experts own their router row and their matrices
    layer = model.model.layers[2].mlp
    own = [*_router(model.model.layers[2]).parameters(recurse=False), *layer.experts.parameters(recurse=False)]
    assert torch.allclose(magnitude[("layers", 2, "experts")][3], sum(p[3].pow(2).sum() for p in own))
    if model_type in NEURONS:  # neuron 5 of expert 1: its gate and up rows, its down column
        w = layer.experts
        want = w.gate_up_proj[1, [5, 29]].pow(2).sum() + w.down_proj[1, :, 5].pow(2).sum()
        assert torch.allclose(magnitude[("layers", 2, "expert_ffn")][1 * 24 + 5], want)
    reap = get_importance("reap").score(model, data)
    assert reap[("layers", 1, "experts")][4] == 0 and (reap[("layers", 1, "experts")] > 0).sum() >= 4
    assert (("layers", 0, "expert_ffn") in reap) == (model_type in NEURONS)
    result = hfprune.prune(model, data, hfprune.PruningConfig(criterion="reap", expert_ratio=0.5))
    assert result.plan.layers[1].get("experts") is not None and 4 not in result.plan.layers[1].get("experts")
    assert not model.hfprune_heterogeneous and len(result.plan.layers[0].get("experts")) == 3  # plain
    assert result.after.params == sum(p.numel() for p in model.parameters())


def test_budgets_over_experts():
    case = MOE_CASES["qwen2_moe"]
    data = _calibration(case)
    with pytest.raises(PlanError, match="fewer than the router's top-k"):  # before any scoring pass
        hfprune.prune(case.build("eager"), data, hfprune.PruningConfig(criterion="reap", expert_ratio=0.2))
    model = case.build("eager")
    result = hfprune.prune(model, data, hfprune.PruningConfig(criterion="reap", expert_ratio=0.5, ffn_ratio=0.4))
    assert {len(layer.get("experts")) for layer in result.plan.layers} == {3}
    assert model.config.moe_intermediate_size == 8 and not model.hfprune_heterogeneous  # 9.6 rounded to 8
    model = case.build("eager")
    result = hfprune.prune(model, data, hfprune.PruningConfig(criterion="random", params_ratio=0.6, scope="uniform"))
    assert result.after.params <= 0.6 * result.before.params and not model.hfprune_heterogeneous
    model = case.build("eager")
    result = hfprune.prune(model, data, hfprune.PruningConfig(criterion="fisher", params_ratio=0.7))
    assert result.after.params <= 0.7 * result.before.params
    assert all(len(layer.get("experts") or range(6)) >= 2 for layer in result.plan.layers)


def test_arch_spec_round_trip():
    model = MOE_CASES["qwen2_moe"].build("eager")
    spec = get_adapter(model).arch_spec(model.config)
    assert ArchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    bert = T.BertConfig()  # records of families without experts stay as earlier versions wrote them
    record = get_adapter(bert).arch_spec(bert).to_dict()
    assert "experts" not in record["stacks"]["layers"]


@pytest.mark.parametrize("criterion", ["fisher", "reap"])
def test_pruning_while_training(criterion, tmp_path):
    """PruningCallback masks experts through the routers' gates while the Trainer trains, then slices them."""
    case = MOE_CASES["mixtral"]
    torch.manual_seed(0)
    model = case.build("eager")
    batches = [case.inputs(seed) for seed in range(8)]
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids}
            for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    callback = hfprune.PruningCallback(
        hfprune.PruningConfig(criterion=criterion, expert_ratio=0.5),
        schedule=hfprune.ScheduleConfig(kind="gradual", start_step=0, end_step=6, every=2),
        calibration=[case.inputs(0)] if criterion == "reap" else None)
    args = T.TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[],
                               average_tokens_across_devices=False, use_cpu=True)
    T.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert [len(layer.get("experts")) for layer in model.hfprune_plan.layers] == [3, 3, 3]
    assert not model.hfprune_heterogeneous and model.config.num_local_experts == 3
    assert torch.isfinite(_run(model, case)).all()


def test_a_plain_checkpoint_pruned_again_per_layer(tmp_path):
    """A reloaded plain MoE checkpoint pruned per layer records its plan against the dense model again."""
    case = MOE_CASES["qwen2_moe"]
    torch.manual_seed(4)
    dense = case.build("eager").eval()
    first = {"layers": [{"experts": [0, 2, 3, 5], "expert_ffn": _neurons([0, 2, 3, 5], 16, i)} for i in range(3)]}
    hfprune.apply_plan(copy.deepcopy(dense), first).save_pretrained(tmp_path / "plain")
    model = hfprune.from_pretrained(tmp_path / "plain").eval()
    model = hfprune.apply_plan(model, {"layers": [{"experts": [0, 1, 3]}, {"expert_ffn": _neurons(range(4), 8, 5, 16)},
                                                  {}]})
    assert model.hfprune_heterogeneous and model.config.num_experts == 6  # the record is relative to the dense model
    expected = _run(model, case)
    model.save_pretrained(tmp_path / "per_layer")
    assert torch.equal(_run(hfprune.from_pretrained(tmp_path / "per_layer").eval(), case), expected)
    once = hfprune.apply_plan(copy.deepcopy(dense), {"layers": model.hfprune_plan.to_dict()["layers"]})
    assert (_run(once, case) - expected).abs().max() <= 1e-6

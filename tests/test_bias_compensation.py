"""Bias compensation (FLAP): removed units replaced by their calibration mean, folded into biases, plain checkpoints."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.core.apply import apply_plan, model_dims
from hfprune.pruning.budget import to_plan
from hfprune.pruning.importance import get_importance
from hfprune.pruning.recovery import compensate_biases, compensation, tunable_blocks

from .cases import CASES


@pytest.mark.parametrize("width", [1, 3])
def test_compensation_is_the_mean_contribution_of_the_removed_units(width):
    g = torch.Generator().manual_seed(0)
    units, out = 5, 4
    w = torch.randn(out, units * width, generator=g)
    mean = torch.randn(units * width, generator=g)
    keep = [1, 3]
    expected = sum(w[:, u * width:(u + 1) * width] @ mean[u * width:(u + 1) * width] for u in (0, 2, 4))
    assert torch.allclose(compensation(w, mean, keep, width).float(), expected, atol=1e-5)
    assert compensation(w, mean, list(range(units)), width).abs().max() == 0  # nothing removed: no change


def _kept(model, model_type):
    """Every other FFN neuron in each layer; for BERT also the odd heads of layer 0 (Llama's grouped heads are
    left whole here: only its FFN is pruned)."""
    kept = {}
    for key, module, width in tunable_blocks(model):
        units = module.in_features // width
        if key[2] == "ffn" or (model_type == "bert" and key[1] == 0):
            kept[key] = list(range(1, units, 2))
    return kept


def _dense_with_removed_units_at_their_mean(model, kept, batches):
    """The reference: the dense model whose removed units' outputs (inputs of the output projection) are replaced
    by their mean over the calibration tokens (padding excluded), computed here with plain hooks."""
    blocks = {key: (module, width) for key, module, width in tunable_blocks(model) if key in kept}
    sums, counts, current = {}, {}, {}

    def accumulate(key):
        def hook(_m, args):
            real = args[0][current["mask"].bool()].double()  # (tokens, features) without padding
            sums[key] = sums.get(key, 0) + real.sum(0)
            counts[key] = counts.get(key, 0) + real.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(accumulate(key)) for key, (module, _) in blocks.items()]
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"]
            model(**b)
    for h in handles:
        h.remove()

    def replace(key):
        module, width = blocks[key]
        removed = [u for u in range(module.in_features // width) if u not in kept[key]]
        cols = torch.tensor([u * width + j for u in removed for j in range(width)])
        mean = (sums[key] / counts[key]).float()

        def hook(_m, args):
            x = args[0].clone()
            x[..., cols] = mean[cols]
            return (x,)

        return hook

    for key, (module, _) in blocks.items():
        module.register_forward_pre_hook(replace(key))
    return model


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_compensated_pruned_model_equals_the_dense_model_with_removed_units_at_their_mean(model_type):
    case = CASES[model_type]
    model = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(3)]
    kept = _kept(model, model_type)
    reference = _dense_with_removed_units_at_their_mean(copy.deepcopy(model), kept, batches)
    deltas = compensate_biases(model, kept, batches)
    assert set(deltas) == set(kept) and all(d.abs().max() > 0 for d in deltas.values())
    apply_plan(model, to_plan(kept, model_dims(model), model.config.model_type))
    probe = case.inputs(7)
    with torch.no_grad():
        assert torch.allclose(case.outputs(model(**probe)), case.outputs(reference(**probe)), atol=1e-5)
    if model_type == "llama":  # the FFN had no bias: the stock flag now says it has one
        assert model.config.mlp_bias and model.model.layers[0].mlp.gate_proj.bias.abs().max() == 0


def test_prune_with_bias_compensation_saves_a_plain_llama_checkpoint(tmp_path):
    case = CASES["llama"]
    model = case.build("eager").eval()
    assert not model.config.mlp_bias
    batches = [case.inputs(s) for s in range(3)]
    config = hfprune.PruningConfig(criterion="fisher", params_ratio=0.8, scope="uniform", bias_compensation=True)
    result = hfprune.prune(model, batches, config)
    assert result.recovery == "rearrange+bias"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mlp_bias"] is True and "auto_map" not in saved and not list(tmp_path.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    probe = case.inputs(5)
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, model(**probe).logits)


def test_heterogeneous_llama_with_compensated_biases_reloads_with_its_remote_code(tmp_path):
    case = CASES["llama"]
    model = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(3)]
    hfprune.prune(model, batches, hfprune.PruningConfig(criterion="fisher", macs_ratio=0.6, seq_len=8,
                                                         bias_compensation=True))
    widths = {layer.mlp.down_proj.in_features for layer in model.model.layers}
    assert len(widths) > 1 and model.config.mlp_bias  # layers differ: this is the remote-code path
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True,
                                                    attn_implementation="eager").eval()
    probe = case.inputs(5)
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, model(**probe).logits)


def test_bias_compensation_errors(monkeypatch):
    case = CASES["mistral"]  # Mistral hard-codes bias=False on o_proj and down_proj
    model = case.build("eager").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [case.inputs(0)]
    config = hfprune.PruningConfig(criterion="fisher", ffn_ratio=0.5, bias_compensation=True)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before finding that the model cannot take the biases")

    monkeypatch.setattr(type(get_importance("fisher")), "score", no_scoring)
    with pytest.raises(ValueError, match="model_type 'mistral' has none there"):
        hfprune.prune(model, batches, config)
    assert model.training  # the mode it came in with
    after = model.state_dict()  # nothing half-done: same tensors, same shapes, no new biases
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="needs calibration data"):
        hfprune.prune(model, None, config)
    with pytest.raises(ValueError, match="bias_compensation=True with recovery='lstsq'"):
        hfprune.PruningConfig(macs_ratio=0.5, recovery="lstsq", bias_compensation=True)


def test_dora_layers_are_refused_and_the_callback_refuses_one_shot_recovery():
    import peft

    case = CASES["llama"]
    model = peft.get_peft_model(case.build("eager"), peft.LoraConfig(r=2, target_modules=["down_proj"],
                                                                      use_dora=True))
    config = hfprune.PruningConfig(criterion="magnitude", ffn_ratio=0.5, bias_compensation=True)
    with pytest.raises(ValueError, match="does not support the DoRA layer"):
        hfprune.prune(model, [case.inputs(0)], config)
    with pytest.raises(ValueError, match="one-shot"):
        hfprune.PruningCallback(config)
    with pytest.raises(ValueError, match="one-shot"):
        hfprune.PruningCallback(hfprune.PruningConfig(macs_ratio=0.5, recovery="lstsq"))

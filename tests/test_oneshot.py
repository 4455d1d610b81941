"""Importance criteria and retraining-free pruning on tiny models of every family."""

import pytest
import torch

import hfprune
from hfprune.core.masking import Masks
from hfprune.pruning.importance import get_importance, importance_class

from .cases import CASES

# every criterion that scores heads and neurons (the expert criteria are tested on MoE models: tests/test_moe.py)
CRITERIA = [n for n in hfprune.supported_importance() if not importance_class(n).experts_only]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2", "patchtst", "informer"])
def test_scores_have_one_value_per_head_and_neuron(model_type, criterion):
    case = CASES[model_type]
    model = case.build("eager").eval()
    scores = get_importance(criterion).score(model, [case.inputs(0), case.inputs(1)])
    gates = Masks(model).gates
    assert scores.keys() == gates.keys()
    for key in gates:
        assert scores[key].shape == gates[key].shape and torch.isfinite(scores[key]).all()
        assert (scores[key] >= 0).all()


def test_magnitude_by_hand():
    model = CASES["bert"].build("eager")
    attn = model.bert.encoder.layer[0].attention
    rows = slice(8, 16)  # head 1 of 4, head_dim 8
    expected = sum(w.weight[rows].pow(2).sum() for w in (attn.self.query, attn.self.key, attn.self.value))
    expected = expected + attn.output.dense.weight[:, rows].pow(2).sum()
    got = get_importance("magnitude").score(model)[("layers", 0, "heads")][1]
    assert torch.allclose(got, expected.float(), rtol=1e-5)


def _non_padding_inputs(model, module, batches) -> torch.Tensor:
    """``module``'s inputs over ``batches`` as (non-padding tokens, features) rows."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])


def test_fluctuation_by_hand():
    """FLAP's score: variance over the (non-padding) tokens of each input feature of the output projection, times
    the squared norm of its weight column, summed over the unit's features."""
    case = CASES["bert"]
    model = case.build("eager").eval()
    batches = [case.inputs(0), case.inputs(1)]
    attn_out = model.bert.encoder.layer[1].attention.output.dense
    tokens = _non_padding_inputs(model, attn_out, batches).double()  # (N, 32)
    per_feature = tokens.var(0, unbiased=False) * attn_out.weight.detach().double().pow(2).sum(0)
    expected = per_feature.reshape(4, 8).sum(-1)  # 4 heads of 8 features
    got = get_importance("fluctuation").score(model, batches)[("layers", 1, "heads")]
    assert torch.allclose(got.double(), expected, rtol=1e-4)


def test_activation_by_hand_leaves_out_padding():
    """Minitron's score: mean over the (non-padding) tokens of each head's output norm at the output projection."""
    case = CASES["bert"]
    model = case.build("eager").eval()
    batches = [case.inputs(0), case.inputs(1)]
    assert any((b["attention_mask"] == 0).any() for b in batches)  # the case must have padding to test this
    tokens = _non_padding_inputs(model, model.bert.encoder.layer[1].attention.output.dense, batches)  # (N, 32)
    expected = tokens.reshape(-1, 4, 8).norm(dim=-1).mean(0)  # 4 heads of 8 features
    got = get_importance("activation").score(model, batches)[("layers", 1, "heads")]
    assert torch.allclose(got, expected, rtol=1e-5)


def test_fisher_is_a_sum_of_squared_per_example_gate_gradients():
    case = CASES["bert"]
    model = case.build("eager").eval()
    batch = case.inputs(0)
    got = get_importance("fisher").score(model, [batch])[("layers", 1, "ffn")]
    masks = Masks(model)
    gate = masks.gates[("layers", 1, "ffn")].requires_grad_(True)
    masks.attach()
    expected = torch.zeros_like(gate)
    for j in range(2):
        one = {k: v[j : j + 1] for k, v in batch.items()}
        logits = model(**one).logits
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1))  # self-supervised: no labels
        (grad,) = torch.autograd.grad(loss, gate)
        expected += grad.pow(2)
    masks.remove()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-12)


def test_data_criteria_need_data_and_unknown_names_list_the_supported():
    model = CASES["bert"].build("eager")
    with pytest.raises(ValueError, match="needs calibration data"):
        hfprune.prune(model, None, hfprune.PruningConfig(criterion="fisher", macs_ratio=0.5))
    with pytest.raises(ValueError, match="choose one of .*magnitude"):
        hfprune.PruningConfig(criterion="l1", macs_ratio=0.5)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give exactly one budget"),
    ({"macs_ratio": 0.5, "params_ratio": 0.5}, "give exactly one budget"),
    ({"macs_ratio": 0.0}, r"macs_ratio=0.0 must be in \(0, 1\]"),
    ({"macs_ratio": 0.5, "scope": "per_layer"}, "scope='per_layer' works with head_ratio"),
    ({"head_ratio": 0.5, "round_to": 0}, "round_to=0 must be >= 1"),
    ({"head_ratio": 0.5, "normalize": "max"}, "normalize='max'"),
])
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hfprune.PruningConfig(criterion="magnitude", **kwargs)


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("budget", [{"macs_ratio": 0.5}, {"params_ratio": 0.8}])
def test_prune_meets_the_budget(model_type, budget):
    case = CASES[model_type]
    model = case.build("eager")
    config = hfprune.PruningConfig(criterion="taylor", seq_len=8, **budget)
    result = hfprune.prune(model, [case.inputs(0)], config)
    if "macs_ratio" in budget:
        assert result.after.macs <= 0.5 * result.before.macs
        assert result.after.macs >= 0.3 * result.before.macs  # the greedy fill uses most of the budget
    else:
        assert result.after.params <= 0.8 * result.before.params
    assert result.after.params == sum(p.numel() for p in model.parameters())
    assert "params" in result.table() and result.model is model


def test_per_layer_ratios_keep_the_same_share_everywhere():
    case = CASES["bert"]
    model = case.build("eager")
    result = hfprune.prune(model, None, hfprune.PruningConfig(criterion="magnitude", head_ratio=0.5, ffn_ratio=0.5))
    for layer in result.plan.layers:
        assert len(layer.get("heads")) == 2 and len(layer.get("ffn")) == 18


def _token_dataset(equal: bool):
    import datasets

    rows = [CASES["bert"].inputs(s) for s in range(3)]
    ids = [r["input_ids"][j].tolist() for r in rows for j in range(2)]
    if not equal:
        ids = [x[: 4 + i % 3] for i, x in enumerate(ids)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                       "label": [i % 3 for i in range(len(ids))], "text": ["a"] * len(ids)})


@pytest.mark.parametrize("equal", [True, False])
def test_calibration_from_a_dataset(equal):
    from hfprune.core.calibration import calibration_batches

    data = _token_dataset(equal)
    batches = calibration_batches(data, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 2] and "text" not in batches[0]
    assert batches[0]["labels"].tolist() == [0, 1, 2, 0]
    if not equal:  # padded with 0 and masked out
        assert batches[0]["input_ids"].shape == (4, 6) and batches[0]["attention_mask"][0].tolist()[-2:] == [0, 0]
    model = CASES["bert"].build("eager")
    config = hfprune.PruningConfig(criterion="fisher", macs_ratio=0.5, seq_len=8, calibration_batch_size=4)
    result = hfprune.prune(model, data, config)
    assert result.after.macs <= 0.5 * result.before.macs


def test_unequal_rows_without_a_mask_or_tokenizer_are_refused():
    import datasets

    from hfprune.core.calibration import calibration_batches

    data = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]]})
    with pytest.raises(ValueError, match="pass a tokenizer"):
        calibration_batches(data, batch_size=2)


def test_uniform_llama_is_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    case = CASES["llama"]
    model = case.build("eager").eval()
    config = hfprune.PruningConfig(criterion="fisher", macs_ratio=0.6, seq_len=8, scope="uniform")
    result = hfprune.prune(model, [case.inputs(0), case.inputs(1)], config)
    assert result.after.macs <= 0.6 * result.before.macs
    heads = {len(layer.get("heads") or range(4)) for layer in result.plan.layers}
    neurons = {len(layer.get("ffn") or range(37)) for layer in result.plan.layers}
    assert len(heads) == 1 and len(neurons) == 1 and (heads, neurons) != ({4}, {37})
    assert model.config.num_attention_heads == heads.pop() and model.config.intermediate_size == neurons.pop()
    assert all(len(layer.get("heads") or ()) % 2 == 0 for layer in result.plan.layers)  # whole KV groups
    assert "hfprune" not in model.config.to_dict()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock class, no remote code
    batch = case.inputs(1)
    assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_batched_fisher_equals_the_per_example_loop(monkeypatch):
    from hfprune.pruning.importance import fisher

    case = CASES["bert"]
    model = case.build("eager").eval()
    batch = {**case.inputs(0), "labels": torch.tensor([0, 2])}
    assert fisher._batched_gradients is not None
    fast = fisher.FisherImportance(keep_blocks=True)
    got = fast.score(model, [batch])
    monkeypatch.setattr(fisher, "_batched_gradients", lambda *a: None)
    slow = fisher.FisherImportance(keep_blocks=True)
    want = slow.score(model, [batch])
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-12)
        assert torch.allclose(fast.blocks[key], slow.blocks[key], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "activation", "fisher"])
def test_prune_again_after_a_block_was_emptied(criterion):
    """GPT-2's emptied FFN is an EmptyFfn without c_fc/c_proj: scoring and selection skip it (they once looked
    for its projections)."""
    case = CASES["gpt2"]
    torch.manual_seed(0)
    model = case.build("eager")
    layers = len(model.transformer.h)
    hfprune.apply_plan(model, {"layers": [{"ffn": []}] + [{}] * (layers - 1)})
    config = hfprune.PruningConfig(criterion=criterion, macs_ratio=0.5, seq_len=8)
    result = hfprune.prune(model, [case.inputs(0)], config)
    assert result.after.macs <= 0.5 * result.before.macs
    assert len(result.scores[("layers", 0, "ffn")]) == 0
    assert result.after.params == sum(p.numel() for p in model.parameters())

"""Depth pruning: block influence (1 - cos of a block's input and output), the choice of layers to drop, and the
plain checkpoint that dropping them gives."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import hfprune
from hfprune import depth

VOCAB = 64


def _llama(layers: int = 5, seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()


def _batches(n: int = 2, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (2, 12), generator=g)} for _ in range(n)]


def _make_identity(model, i: int) -> None:
    """Layer ``i`` adds nothing to the residual stream: its attention and FFN outputs are zero."""
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


# -- pure math ----------------------------------------------------------------------------------------------


def test_token_influence_values_and_mask():
    h = torch.randn(2, 3, 8)
    total, n = depth.token_influence(h, h)
    assert n == 6 and abs(float(total)) < 1e-5  # unchanged: influence 0
    total, _ = depth.token_influence(h, -h)
    assert torch.isclose(total, torch.tensor(12.0))  # reversed: 1 - (-1) = 2 per token
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = h.clone()
    out[mask == 0] *= -1  # only padded tokens change
    total, n = depth.token_influence(h, out, mask)
    assert n == 3 and abs(float(total)) < 1e-5
    with pytest.raises(ValueError, match="differ in shape"):
        depth.token_influence(h, h[:, :2])


def test_choose_drops_least_influential_first_until_budget():
    influence = [0.5, 0.1, 0.3, 0.05, 0.9]
    params = [10] * 5
    assert depth.choose_drops(influence, params, total_params=100, budget_params=80) == [1, 3]
    assert depth.choose_drops(influence, params, 100, 79) == [1, 2, 3]
    assert depth.choose_drops(influence, params, 100, 100) == []
    assert depth.choose_drops(influence, params, 100, 80, protect=[3]) == [1, 2]
    with pytest.raises(ValueError, match="above the budget"):
        depth.choose_drops(influence, params, 100, 10)  # even four drops leave 60
    with pytest.raises(ValueError, match="4 influence scores for 5 layers"):
        depth.choose_drops(influence[:4], params, 100, 80)


# -- on a model ---------------------------------------------------------------------------------------------


def test_block_influence_matches_hidden_states():
    model = _llama()
    batches = _batches()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.model.layers]
    influence = depth.block_influence(model, batches)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.model.layers] == hooks  # removed
    assert influence.shape == (5,)
    # reference: output_hidden_states gives each layer's input; the last entry is after the final norm,
    # so layers 0..L-2 can be checked against it
    sums, count = torch.zeros(5), 0
    with torch.no_grad():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states
            for i in range(4):
                sums[i] += depth.token_influence(hs[i], hs[i + 1])[0]
            count += batch["input_ids"].numel()
    torch.testing.assert_close(influence[:4], sums[:4] / count, rtol=1e-4, atol=1e-6)


def test_identity_layer_is_dropped_and_the_model_is_unchanged(tmp_path):
    model = _llama()
    _make_identity(model, 2)
    batches = _batches()
    influence = depth.block_influence(model, batches)
    assert int(influence.argmin()) == 2 and float(influence[2]) < 1e-5
    before = model(**batches[0]).logits

    plan = depth.depth_plan(model, batches, num_drop=1)
    assert [layer.drop for layer in plan.layers] == [False, False, True, False, False]
    hfprune.apply_plan(model, plan)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    torch.testing.assert_close(model(**batches[0]).logits, before, rtol=1e-5, atol=1e-5)

    # a plain checkpoint: stock transformers reloads it with no remote code, and it generates the same tokens
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.py"))
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is T.LlamaForCausalLM
    torch.testing.assert_close(reloaded(**batches[0]).logits, before, rtol=1e-5, atol=1e-5)
    ids = batches[0]["input_ids"][:1]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(reloaded.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_params_budget_is_met():
    model = _llama(layers=6)
    total = sum(p.numel() for p in model.parameters())
    per_layer = depth.layer_param_counts(model)
    influence = depth.block_influence(model, _batches(1))
    plan = depth.depth_plan(model, params_ratio=0.8, influence=influence)
    dropped = [i for i, layer in enumerate(plan.layers) if layer.drop]
    # the fewest least-influential layers that bring the model under 80% of its parameters
    need = next(k for k in range(7) if total - k * per_layer[0] <= 0.8 * total)
    assert len(dropped) == need
    assert dropped == sorted(torch.argsort(influence, stable=True)[:need].tolist())
    hfprune.apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) <= 0.8 * total
    same = depth.depth_plan(_llama(layers=6), params=int(0.8 * total), influence=influence)
    assert same == plan


def test_depth_plan_rejects_bad_budgets():
    model = _llama()
    influence = torch.rand(5)
    with pytest.raises(ValueError, match="exactly one budget"):
        depth.depth_plan(model, influence=influence)
    with pytest.raises(ValueError, match="exactly one budget"):
        depth.depth_plan(model, influence=influence, num_drop=1, params_ratio=0.5)
    with pytest.raises(ValueError, match="num_drop=5"):
        depth.depth_plan(model, influence=influence, num_drop=5)
    with pytest.raises(ValueError, match="params_ratio=1.5"):
        depth.depth_plan(model, influence=influence, params_ratio=1.5)
    with pytest.raises(ValueError, match="3 influence scores"):
        depth.depth_plan(model, influence=influence[:3], num_drop=1)
    with pytest.raises(ValueError, match="calibration batches"):
        depth.depth_plan(model, num_drop=1)

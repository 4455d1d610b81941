"""Kwon et al. recovery: least squares against closed forms, exact folding, rearrangement that never hurts."""

import pytest
import torch

import hfprune
from hfprune.core.masking import Masks
from hfprune.pruning.recovery import (
    fold_scales,
    normal_equations,
    quadratic_loss,
    rearrange,
    rearrange_kept,
    solve_scales,
    tunable_blocks,
    tune_scales,
)

from .cases import CASES


def test_lstsq_equals_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 5, generator=g, dtype=torch.float64)
    b = torch.randn(50, generator=g, dtype=torch.float64)
    ata, atb = a.T @ a, a.T @ b
    s = solve_scales(ata, atb, ridge=0.0, clamp=(-1e9, 1e9))
    assert torch.allclose(s, torch.linalg.inv(ata) @ atb, atol=1e-10)
    lam = 0.5 * ata.diagonal().mean()
    ridge = solve_scales(ata, atb, ridge=0.5, clamp=(-1e9, 1e9))
    assert torch.allclose(ridge, torch.linalg.inv(ata + lam * torch.eye(5, dtype=torch.float64)) @ atb, atol=1e-10)
    assert solve_scales(ata * 1e-12, atb, ridge=0.0).abs().max() == 10.0  # clamped to the trusted range


@pytest.mark.parametrize("width", [1, 4])
def test_normal_equations_match_explicit_contributions(width):
    g = torch.Generator().manual_seed(1)
    units, out, n = 6, 5, 40
    x = torch.randn(n, units * width, generator=g)
    w = torch.randn(out, units * width, generator=g)
    y = torch.randn(n, out, generator=g)
    keep = [0, 2, 5]
    cols = [(x[:, u * width:(u + 1) * width] @ w[:, u * width:(u + 1) * width].T).reshape(-1) for u in keep]
    a = torch.stack(cols, 1).double()  # (n * out, k)
    ata, atb = normal_equations(x, w, y, keep, width)
    assert torch.allclose(ata, a.T @ a, rtol=1e-6) and torch.allclose(atb, a.T @ y.reshape(-1).double(), rtol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_folding_scales_equals_gating(model_type):
    case = CASES[model_type]
    model = case.build("eager").eval()
    batch = case.inputs(0)
    g = torch.Generator().manual_seed(2)
    masks = Masks(model)
    scales = {k: torch.rand(len(v), generator=g) * 2 for k, v in masks.gates.items()}
    with torch.no_grad():
        for k, gate in masks.gates.items():
            gate.copy_(scales[k])
        masks.attach()
        gated = model(**batch).logits
        masks.remove()
        for key, module, width in tunable_blocks(model):
            fold_scales(module, scales[key], width)
        folded = model(**batch).logits
    assert torch.allclose(gated, folded, atol=1e-5, rtol=1e-4)


def test_rearrangement_keeps_counts_and_never_raises_the_objective():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        grads = torch.randn(30, 12, generator=g) * torch.rand(12, generator=g)
        fisher = grads.T @ grads
        keep = sorted(torch.randperm(12, generator=g)[: 3 + trial % 7].tolist())
        new = rearrange(fisher, keep)
        assert len(new) == len(keep) and len(set(new)) == len(new)
        assert quadratic_loss(fisher, new) <= quadratic_loss(fisher, keep) + 1e-9
    # interactions matter: units 0 and 1 cancel each other, so removing both costs nothing, unlike the diagonal
    grads = torch.tensor([[1.0, -1.0, 0.6], [2.0, -2.0, 0.5]])
    fisher = grads.T @ grads
    assert rearrange(fisher, [0]) == [2]  # by the diagonal, 2 goes first; together, 0 and 1 are free to remove


def test_rearranged_attention_keeps_whole_groups():
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(20, 6, generator=g)
    blocks = {("layers", 0, "heads"): grads.T @ grads}
    kept = rearrange_kept({("layers", 0, "heads"): [0, 1]}, blocks, {("layers", 0, "heads"): 2})
    heads = kept[("layers", 0, "heads")]
    assert len(heads) == 2 and heads[0] % 2 == 0 and heads[1] == heads[0] + 1


def test_tuning_an_unpruned_model_keeps_unit_scales():
    case = CASES["bert"]
    model = case.build("eager").eval()
    dense = model(**case.inputs(0)).logits.detach()
    scales = tune_scales(model, {}, [case.inputs(0), case.inputs(1)], ridge=0.0)
    for s in scales.values():  # the dense block reproduces itself: the least-squares scales are all 1
        assert torch.allclose(s, torch.ones_like(s), atol=1e-4)
    assert torch.allclose(model(**case.inputs(0)).logits, dense, atol=1e-4)


def test_tuning_lowers_the_block_error_of_a_pruned_layer():
    case = CASES["bert"]
    model = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(3)]
    kept = {("layers", 0, "ffn"): list(range(0, 37, 2))}
    layer = model.bert.encoder.layer[0]
    outputs = {}
    hook = layer.output.dense.register_forward_hook(lambda m, a, o: outputs.__setitem__("y", o.detach()))
    with torch.no_grad():
        dense = [(model(**b), outputs["y"])[1] for b in batches]
        with hfprune.core.masking.masked(model, {"layers": [{"ffn": kept[("layers", 0, "ffn")]}, {}, {}]}):
            before = [(model(**b), outputs["y"])[1] for b in batches]
        scales = tune_scales(model, kept, batches)
        with hfprune.core.masking.masked(model, {"layers": [{"ffn": kept[("layers", 0, "ffn")]}, {}, {}]}):
            after = [(model(**b), outputs["y"])[1] for b in batches]
    hook.remove()
    assert ("layers", 0, "ffn") in scales
    err = lambda ys: sum(float((y - d).pow(2).sum()) for y, d in zip(ys, dense))  # noqa: E731
    assert err(after) < err(before)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("recovery", ["rearrange", "lstsq", "full"])
def test_prune_with_recovery_stays_within_budget(model_type, recovery):
    case = CASES[model_type]
    model = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(3)]
    result = hfprune.prune(model, batches, hfprune.PruningConfig(criterion="fisher", macs_ratio=0.6, seq_len=8,
                                                                recovery=recovery))
    assert result.after.macs <= 0.6 * result.before.macs and result.recovery == recovery
    assert (result.scales is not None) == (recovery != "rearrange")
    assert torch.isfinite(model(**case.inputs(0)).logits).all()


def test_recovery_validation():
    with pytest.raises(ValueError, match="needs criterion='fisher'"):
        hfprune.PruningConfig(criterion="magnitude", macs_ratio=0.5, recovery="full")
    with pytest.raises(ValueError, match="recovery='fast'"):
        hfprune.PruningConfig(macs_ratio=0.5, recovery="fast")
    assert hfprune.PruningConfig(macs_ratio=0.5).resolved_recovery == "rearrange"  # measured to help; lstsq did not
    assert hfprune.PruningConfig(criterion="taylor", macs_ratio=0.5).resolved_recovery == "none"

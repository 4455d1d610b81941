"""Structured OBS reconstruction: the update against the constrained least-squares closed form, the greedy pick
against brute force, the layer replay against the model's own forward pass, refusals that change nothing."""

import copy

import pytest
import torch

import hfprune
from hfprune.core.apply import apply_plan, model_dims
from hfprune.core.blocks import weight_out_in
from hfprune.core.calibration import token_rows
from hfprune.pruning.budget import to_plan
from hfprune.pruning.recovery import tunable_blocks
from hfprune.pruning.recovery.obs import damped_inverse, drop_columns, greedy_drop, reconstruct

from .cases import CASES


def _system(seed: int, n: int = 60, units: int = 8, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, units, generator=g, dtype=torch.float64) @ torch.randn(units, units, generator=g,
                                                                                dtype=torch.float64)
    return torch.randn(out, units, generator=g, dtype=torch.float64), x.T @ x


def _constrained_lstsq(w, hessian, removed, damp):
    """argmin over W' with W'[:, removed] = 0 of tr((W' - W) Hd (W' - W)^T), Hd the damped Hessian."""
    hd = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype)
    keep = [j for j in range(w.shape[1]) if j not in removed]
    want = torch.zeros_like(w)
    want[:, keep] = w @ hd[:, keep] @ torch.linalg.inv(hd[keep][:, keep])
    return want, hd


def _loss(w_new, w, hd):
    d = w_new - w
    return float(torch.trace(d @ hd @ d.T))


@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_drop_columns_is_the_constrained_least_squares_solution(damp):
    w, h = _system(0)
    removed = [1, 4, 5]
    got, hinv = drop_columns(w, damped_inverse(h, damp), removed)
    want, hd = _constrained_lstsq(w, h, removed, damp)
    assert torch.allclose(got, want, atol=1e-9)
    assert got[:, removed].abs().max() == 0 and hinv[removed].abs().max() == 0
    keep = [j for j in range(8) if j not in removed]  # what is left is the inverse of the kept sub-Hessian
    assert torch.allclose(hinv[keep][:, keep], torch.linalg.inv(hd[keep][:, keep]), atol=1e-9)


def test_greedy_drop_picks_the_cheapest_unit_each_time_and_composes_to_the_joint_update():
    w, h = _system(1)
    got, removed = greedy_drop(w, damped_inverse(h, 0.01), 3)
    want, hd = _constrained_lstsq(w, h, removed, 0.01)
    assert len(set(removed)) == 3 and torch.allclose(got, want, atol=1e-9)
    costs = {j: _loss(_constrained_lstsq(w, h, [j], 0.01)[0], w, hd) for j in range(8)}
    assert removed[0] == min(costs, key=costs.get)  # brute force agrees on the first pick
    second = {j: _loss(_constrained_lstsq(w, h, [removed[0], j], 0.01)[0], w, hd) for j in range(8)
              if j != removed[0]}
    assert removed[1] == min(second, key=second.get)


def test_damped_inverse_survives_inputs_that_never_fire():
    w, h = _system(2)
    h[3] = 0
    h[:, 3] = 0
    hinv = damped_inverse(h, 0.0)
    assert torch.isfinite(hinv).all()
    got, removed = greedy_drop(w, hinv, 2)
    assert removed[0] == 3  # an input that never fires costs nothing to remove
    assert torch.isfinite(got).all() and got[:, removed].abs().max() == 0


def _kept(model, model_type):
    """Half the FFN neurons and, for BERT, one head in two removed, in every layer."""
    out = {}
    for key, module, width in tunable_blocks(model):
        units = weight_out_in(module).shape[1] // width
        if width == 1 or model_type == "bert":
            out[key] = list(range(0, units, 2))
    return out


def _inputs_of(model, module, batch) -> torch.Tensor:
    """(tokens, in) inputs of ``module`` over every call in a forward pass, padding left out."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return torch.cat([token_rows(x, batch) for x in seen])


REPLAYABLE = sorted(set(CASES) - {"informer"})  # Informer's ProbSparse attention is refused (a test below)


@pytest.mark.parametrize("model_type", REPLAYABLE)
def test_each_block_is_the_least_squares_fit_on_the_pruned_models_own_inputs(model_type):
    """After reconstruction, a forward pass of the (pruned-equivalent) model gives every block the inputs the
    layer replay saw: each block's new weight must be the closed-form fit on exactly those (padding left out).
    This checks the replay (KV cache off, per-layer kwargs, blocks in the order they run: PatchTSMixer's differs
    from its block list) for every family."""
    case = CASES[model_type]
    torch.manual_seed(0)  # the weights must not depend on which tests ran before (the re-pick check below)
    model = case.build(case.attn_implementations[0]).eval()
    batches = [case.inputs(s) for s in range(3)]  # text batches: the second row is padded
    original = {key: weight_out_in(m).clone() for key, m, _ in tunable_blocks(model)}
    kept = _kept(model, model_type)
    picked = reconstruct(model, kept, batches, damp=0.01)
    for key, module, width in tunable_blocks(model):
        if key not in kept:
            continue
        x = torch.cat([_inputs_of(model, module, batch) for batch in batches]).double()
        w0 = original[key].double()
        assert len(picked[key]) == len(kept[key])
        if width == 1:
            assert picked[key] != sorted(kept[key])  # re-picked (these tiny models are random: it always is)
        removed_units = sorted(set(range(w0.shape[1] // width)) - set(picked[key]))
        removed = [u * width + d for u in removed_units for d in range(width)]
        want, _ = _constrained_lstsq(w0, x.T @ x, removed, 0.01)
        assert torch.allclose(weight_out_in(module).double(), want, atol=1e-4), key


def test_prune_with_obs_is_closer_to_the_dense_model_and_saves_a_plain_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    case = CASES["llama"]
    dense = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(4)]
    errors = {}
    for recovery in ("none", "obs"):
        model = copy.deepcopy(dense)
        config = hfprune.PruningConfig(criterion="activation", params_ratio=0.85, scope="uniform",
                                       recovery=recovery)
        result = hfprune.prune(model, batches, config)
        assert result.recovery == recovery
        with torch.no_grad():
            errors[recovery] = sum(float((model(**b).logits - dense(**b).logits).pow(2).mean()) for b in batches)
    assert errors["obs"] < errors["none"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    probe = case.inputs(9)
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, model(**probe).logits)


def _informer(**overrides):
    import transformers as T

    from .cases_ts import _SEQ2SEQ

    config = T.InformerConfig(**{**_SEQ2SEQ, "attention_type": "prob", "sampling_factor": 2, "distil": True,
                                 **overrides})
    return T.InformerForPrediction._from_config(config).eval()


@pytest.mark.parametrize("overrides, message", [
    ({}, "draws random numbers"),  # ProbSparse: a replay draws other keys
    ({"attention_type": "full"}, "does not take layer 0's output as its input"),  # distilling convolutions
    ({"attention_type": "full", "distil": False}, None),  # neither: replayable
])
def test_stacks_that_cannot_be_replayed_are_refused_before_anything_changes(overrides, message):
    model = _informer(**overrides)
    batches = [CASES["informer"].inputs(s) for s in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {key: [0] for key, module, width in tunable_blocks(model) if width == 1}
    if message is None:
        reconstruct(model, kept, batches)
        assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    with pytest.raises(ValueError, match=message):
        reconstruct(model, kept, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_autoformer_heads_are_refused_and_its_ffn_is_not():
    case = CASES["autoformer"]
    model = case.build(None).eval()
    batches = [case.inputs(s) for s in range(2)]
    heads = {("layers", 0, "heads"): [0]}  # Autoformer keeps its query-averaging attention out of tunable_blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="averages query-key scores"):
        reconstruct(model, heads, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert reconstruct(model, _kept(model, "autoformer"), batches)


def test_dora_is_refused():
    from peft import LoraConfig, get_peft_model

    case = CASES["llama"]
    model = get_peft_model(case.build("eager").eval(), LoraConfig(r=4, target_modules=["down_proj"],
                                                                  use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        reconstruct(model, _kept(model, "llama"), [case.inputs(0)])


def test_a_failure_half_way_restores_every_weight(monkeypatch):
    import hfprune.pruning.recovery.obs as obs

    case = CASES["llama"]
    model = case.build("eager").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fail_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated")
        return greedy_drop(*args)

    monkeypatch.setattr(obs, "greedy_drop", fail_on_the_third)
    with pytest.raises(RuntimeError, match="simulated"):
        reconstruct(model, _kept(model, "llama"), [case.inputs(s) for s in range(2)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.use_cache is True


def test_obs_with_bias_compensation_is_refused():
    with pytest.raises(ValueError, match="recovery='obs'.*count them twice"):
        hfprune.PruningConfig(criterion="activation", params_ratio=0.8, recovery="obs", bias_compensation=True)


@pytest.mark.parametrize("merge_first", [False, True])
def test_lora_model_prunes_like_its_merged_model(merge_first):
    """Heads and neurons pruned through LoRA-wrapped o/down projections (unmerged, or merged into the base weight
    with merge_adapter()) give what the merged plain model gives."""
    from peft import LoraConfig, get_peft_model

    case = CASES["llama"]
    base = case.build("eager").eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj", "down_proj", "up_proj"],
                                                 init_lora_weights=False))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if merge_first:
        peft_model.merge_adapter()
    batches = [case.inputs(s) for s in range(3)]
    # activation: scored on the forward pass, which the merged model computes too (magnitude reads base weights)
    config = hfprune.PruningConfig(criterion="activation", params_ratio=0.6, scope="uniform", recovery="obs")
    hfprune.prune(peft_model, batches, config)
    hfprune.prune(merged, batches, config)
    assert merged.config.num_attention_heads < 4  # heads went too: the attention update ran on LoRA o_proj
    probe = case.inputs(5)
    with torch.no_grad():
        if merge_first:
            peft_model.unmerge_adapter()
        after = peft_model.merge_and_unload()
        assert torch.allclose(after(**probe).logits, merged(**probe).logits, atol=1e-4)
        assert all(a.mlp.down_proj.in_features == b.mlp.down_proj.in_features
                   for a, b in zip(after.model.layers, merged.model.layers))


def test_plan_after_obs_is_applied_on_the_reconstructed_weights():
    """Slicing the reconstructed model keeps exactly its kept columns: the pruned model computes what the
    reconstructed dense model (removed columns at zero) computes."""
    case = CASES["llama"]
    model = case.build("eager").eval()
    batches = [case.inputs(s) for s in range(2)]
    picked = reconstruct(model, _kept(model, "llama"), batches)
    dense_equivalent = copy.deepcopy(model)
    apply_plan(model, to_plan(picked, model_dims(model), model.config.model_type))
    probe = case.inputs(4)
    with torch.no_grad():
        assert torch.allclose(model(**probe).logits, dense_equivalent(**probe).logits, atol=1e-5)


@pytest.mark.parametrize("old", ["hfprune.pruning.obs", "hfprune.obs", "hfprune.recovery.obs"])
def test_old_import_paths_are_this_module(old):
    import importlib

    import hfprune.pruning.recovery.obs

    module = importlib.import_module(old)
    assert module is hfprune.pruning.recovery.obs and module.reconstruct is hfprune.pruning.recovery.reconstruct

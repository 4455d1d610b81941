"""Weight-level sparsity: patterns are what they say, masked models equal the model with those weights zeroed,
SparseGPT's update beats plain zeroing, errors come before changes, checkpoints (zeros in place and compact)
reload to identical outputs, and structured plus sparse pruning compose in one checkpoint."""

import copy
import json

import pytest
import torch
import transformers as T

import hfprune
from hfprune.core.checkpoint.sparse import compress, decompress, pack_bits, unpack_bits
from hfprune.pruning.recovery.obs import damped_inverse
from hfprune.pruning.sparsity import SparsityConfig, save_sparse, sparsify
from hfprune.pruning.sparsity.criteria import owl_sparsities
from hfprune.pruning.sparsity.patterns import is_nm, mask_for, nm_mask, parse_pattern, unstructured_mask
from hfprune.pruning.sparsity.sparsegpt import sparsegpt_prune
from hfprune.pruning.sparsity.targets import apply_masks, find_targets

from .cases import CASES


def _llama(seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return T.LlamaForCausalLM(config).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2LMHeadModel(config).eval()


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 99, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- patterns and config ----------------------------------------------------------------------


def test_patterns_keep_exact_counts_and_shapes():
    s = torch.randn(16, 32)
    assert int(unstructured_mask(s, 0.75).sum()) == 128
    assert (unstructured_mask(s, 0.5, per_row=True).sum(1) == 16).all()
    m = nm_mask(s, 2, 4)
    assert is_nm(m, 2, 4) and int(m.sum()) == 256
    assert (m.reshape(16, 8, 4).sum(-1) == 2).all()
    b = mask_for(s, parse_pattern("block:4x8"), 0.5)
    tiles = b.reshape(4, 4, 4, 8).float().mean((1, 3))
    assert set(tiles.flatten().tolist()) <= {0.0, 1.0} and int(tiles.sum()) == 8
    # the kept weights are the highest scores
    keep = unstructured_mask(s, 0.5)
    assert s[keep].min() >= s[~keep].max()


@pytest.mark.parametrize("kwargs, words", [
    ({"criterion": "obd"}, ["'obd'", "magnitude", "sparsegpt"]),
    ({"pattern": "2:2"}, ["'2:2'", "0 < N < M"]),
    ({"pattern": "dense"}, ["'dense'", "N:M", "block:RxC"]),
    ({"pattern": "2:4", "sparsity": 0.7}, ["2 of every 4", "0.7"]),
    ({"pattern": "2:4", "ratios": "owl"}, ["'owl'", "uniform"]),
    ({"sparsity": 1.0}, ["sparsity=1.0", "[0, 1)"]),
    ({"ratios": "global"}, ["'global'", "owl"]),
])
def test_config_errors_name_the_value_and_the_choices(kwargs, words):
    with pytest.raises(ValueError) as err:
        SparsityConfig(**kwargs)
    assert all(w in str(err.value) for w in words), err.value


def test_owl_ratios_average_the_target_and_favour_outlier_layers():
    s = owl_sparsities([0.01, 0.05, 0.02, 0.03], 0.6, 0.08)
    assert abs(sum(s) / 4 - 0.6) < 1e-9 and max(s) - min(s) == pytest.approx(0.16)
    assert s[1] == min(s) and s[0] == max(s)


def test_bit_packing_round_trips():
    for n in (1, 7, 8, 9, 100):
        mask = torch.rand(n) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), n), mask)
    w = torch.randn(5, 11)
    w[w.abs() < 0.8] = 0
    c = compress(w)
    assert torch.equal(decompress(*c.values()), w) and c[".__values"].numel() == int((w != 0).sum())


# -- sparsify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_magnitude_masks_every_family_and_equals_zeroed_weights(model_type):
    case = CASES[model_type]
    torch.manual_seed(0)
    model = case.build("eager").eval()
    dense = copy.deepcopy(model)
    result = sparsify(model, None, SparsityConfig(sparsity=0.5))
    targets = find_targets(dense)
    assert targets and set(result.masks) == {t.name for t in targets}
    for t in find_targets(model):
        assert abs(float((t.weight() == 0).float().mean()) - 0.5) < 0.02, t.name
    apply_masks(targets, result.masks)  # the dense copy with exactly the masked weights zeroed
    inputs = case.inputs(0)
    with torch.no_grad():
        torch.manual_seed(1)
        a = case.outputs(model(**inputs))
        torch.manual_seed(1)
        b = case.outputs(dense(**inputs))
    a, b = _flat(a), _flat(b)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _flat(x) -> list:
    return [t for item in x for t in _flat(item)] if isinstance(x, (tuple, list)) else [x]


@pytest.mark.parametrize("build", [_llama, _gpt2])
@pytest.mark.parametrize("criterion", ["magnitude", "random", "wanda", "sparsegpt"])
def test_two_four_is_two_four_in_every_projection(build, criterion):
    model = build()
    dense = copy.deepcopy(model)
    result = sparsify(model, _batches(), SparsityConfig(criterion=criterion, pattern="2:4"))
    for t in find_targets(model):
        assert is_nm(t.weight() != 0, 2, 4), t.name  # along the input dimension, Conv1D included
        assert is_nm(result.masks[t.name], 2, 4)
    if criterion != "sparsegpt":  # sparsegpt also moves the kept weights
        apply_masks(find_targets(dense), result.masks)
        assert torch.equal(_logits(model, _batches()[0]), _logits(dense, _batches()[0]))
    assert result.plan.sparsity == pytest.approx(0.5)
    assert "| layer |" in result.to_markdown()


def test_sparsegpt_update_beats_zeroing_the_same_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g,
                                                                             dtype=torch.float64)
    w = torch.randn(24, 64, generator=g, dtype=torch.float64)
    h = x.T @ x
    for pattern in ("unstructured", "2:4", "block:4x4"):
        new, keep = sparsegpt_prune(w, h, parse_pattern(pattern), 0.5, block_size=16)
        assert (new[~keep] == 0).all() and float((~keep).float().mean()) == pytest.approx(0.5)
        err_obs = ((new - w) @ x.T).pow(2).sum()
        err_zero = ((w * keep - w) @ x.T).pow(2).sum()
        assert err_obs < 0.8 * err_zero, pattern


def test_sparsegpt_in_place_gives_the_same_numbers():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 32, generator=g, dtype=torch.float64)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    h = x.T @ x
    for pattern in ("unstructured", "2:4"):
        want = sparsegpt_prune(w, h, parse_pattern(pattern), 0.5, block_size=8)
        before = h.clone()
        assert torch.equal(sparsegpt_prune(w, h, parse_pattern(pattern), 0.5, block_size=8)[0], want[0])
        assert torch.equal(h, before)  # not overwritten unless asked
        got = sparsegpt_prune(w, h.clone(), parse_pattern(pattern), 0.5, block_size=8, overwrite=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_shared_hessians_are_not_overwritten_before_their_last_projection(monkeypatch):
    import hfprune.pruning.sparsity.oneshot as oneshot

    real, calls = oneshot.sparsegpt_prune, []

    def record(weight, hessian, *args, overwrite=False, **kwargs):
        calls.append((id(hessian), overwrite, hessian.clone()))
        return real(weight, hessian, *args, overwrite=overwrite, **kwargs)

    monkeypatch.setattr(oneshot, "sparsegpt_prune", record)
    sparsify(_llama(7), _batches(2, seed=7), SparsityConfig(criterion="sparsegpt", sparsity=0.5))
    # per layer q, k, v (one input), o, gate, up (one input), down: only the last reader of each input overwrites
    assert [o for _, o, _ in calls[:7]] == [False, False, True, True, False, True, True]
    assert torch.equal(calls[0][2], calls[2][2]) and calls[0][0] == calls[2][0]  # v saw q's Hessian unchanged


def test_sparsegpt_on_one_column_is_the_obs_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(1, 6, generator=g, dtype=torch.float64)
    h = x.T @ x
    new, keep = sparsegpt_prune(w, h, parse_pattern("unstructured"), 1 / 6, damp=0.01)
    j = int((~keep).nonzero()[0, 1])
    hinv = damped_inverse(h, 0.01)
    want = w - w[0, j] / hinv[j, j] * hinv[j]  # OBS: remove weight j, move the others
    # SparseGPT visits columns in order, so only the columns after j move: the exact OBS update when j is first
    if j == 0:
        assert torch.allclose(new, want, atol=1e-9)
    assert new[0, j] == 0


def _reference_sparsegpt(w, h, pattern, sparsity, block, damp=0.01):
    """The paper's algorithm written out plainly: at column ``i`` the OBS quantities come from an explicit inverse
    of the damped Hessian of the columns not yet visited, ``inv(H[i:, i:])``, and each pruned weight's error goes
    onto those columns at once (no Cholesky factor, no lazy block updates)."""
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    n = w.shape[1]
    inv = [torch.linalg.inv(h[i:, i:]) for i in range(n)]  # inv[i][0] is the OBS row of column i
    keep = torch.ones_like(w, dtype=torch.bool)
    for i in range(n):
        if pattern.kind == "n:m" and i % pattern.m == 0:
            g = range(i, i + pattern.m)
            score = torch.stack([w[:, j] ** 2 / inv[j][0, 0] for j in g], 1)
            keep[:, i:i + pattern.m] = nm_mask(score, pattern.n, pattern.m)
        elif pattern.kind == "unstructured" and i % block == 0:
            g = range(i, min(i + block, n))
            score = torch.stack([w[:, j] ** 2 / inv[j][0, 0] for j in g], 1)
            keep[:, i:i + len(g)] = unstructured_mask(score, sparsity)
        pruned = ~keep[:, i]
        w[pruned, i:] -= (w[pruned, i] / inv[i][0, 0]).unsqueeze(1) * inv[i][0].unsqueeze(0)
    return w * keep, keep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_equals_the_plain_column_by_column_obs(pattern):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    x[:, 7] = 0  # an input that never fires
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    h = x.T @ x
    p = parse_pattern(pattern)
    want, want_keep = _reference_sparsegpt(w, h, p, 0.5, block=8)
    got, keep = sparsegpt_prune(w, h, p, 0.5, block_size=8)
    assert torch.equal(keep, want_keep)  # the N:M groups are chosen on the weights updated by the groups before
    assert torch.allclose(got, want, atol=1e-9)
    assert (got[:, 7] == 0).all()  # the dead input's weights go first


def test_sparsegpt_reconstruction_beats_wanda_and_magnitude_masks():
    g = torch.Generator().manual_seed(6)
    # like a model's hidden states: strongly correlated features (rank 12 plus noise) of uneven norms
    scale = torch.rand(48, generator=g, dtype=torch.float64) * 3
    low = torch.randn(512, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 48, generator=g,
                                                                                dtype=torch.float64)
    x = (low + 0.1 * torch.randn(512, 48, generator=g, dtype=torch.float64)) * scale
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    h = x.T @ x

    def err(new):
        return float(((new - w) @ x.T).pow(2).sum())

    for pattern in ("unstructured", "2:4"):
        p = parse_pattern(pattern)
        new, keep = sparsegpt_prune(w, h, p, 0.5)
        wanda = mask_for(w.abs() * h.diagonal().sqrt(), p, 0.5, per_row=True)
        magnitude = mask_for(w.abs(), p, 0.5)
        assert err(new) < 0.5 * err(w * wanda) and err(new) < 0.25 * err(w * magnitude), pattern
        assert err(new) < 0.5 * err(w * keep), pattern  # the update, not only the mask


def test_sparsegpt_statistics_come_from_the_pruned_earlier_layers(monkeypatch):
    import hfprune.pruning.recovery.obs as obs
    import hfprune.pruning.sparsity.criteria as criteria
    import hfprune.pruning.sparsity.oneshot as oneshot

    seen, calls = {}, []
    real_prune, real_acc = oneshot.sparsegpt_prune, obs.accumulate_hessian

    def record(weight, hessian, *args, **kwargs):
        seen[len(seen)] = hessian.clone()
        return real_prune(weight, hessian, *args, **kwargs)

    def count(*args):
        calls.append(1)
        return real_acc(*args)

    monkeypatch.setattr(oneshot, "sparsegpt_prune", record)
    monkeypatch.setattr(criteria, "accumulate_hessian", count)
    model, batches = _llama(7), _batches(3, seed=7)
    sparsify(model, batches, SparsityConfig(criterion="sparsegpt", sparsity=0.5))
    # q/k/v and gate/up read one tensor each: 4 Hessians per layer and batch, not 7
    assert len(calls) == 4 * 2 * len(batches)
    # layer 1's q_proj was fitted to the inputs that the pruned layer 0 gives it (its norm is not pruned)
    xs = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    want = sum(real_acc(None, x, b) for x, b in zip(xs, batches))
    assert torch.allclose(seen[7], want, rtol=1e-6, atol=1e-8)  # targets in order: layer 1's q_proj is 8th


def test_sparsegpt_and_wanda_beat_magnitude_on_the_model_output():
    dense = _llama(3)
    batches = _batches(4, seed=3)
    errs = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        sparsify(model, batches, SparsityConfig(criterion=criterion, sparsity=0.6))
        errs[criterion] = float((_logits(model, batches[0]) - _logits(dense, batches[0])).pow(2).mean())
    assert errs["sparsegpt"] < errs["magnitude"], errs


def test_owl_and_movement_and_head_targets():
    model = _llama(4)
    result = sparsify(model, _batches(), SparsityConfig(criterion="wanda", sparsity=0.6, ratios="owl"))
    per_layer = list(result.layer_sparsity.values())
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.6)
    assert result.plan.sparsity == pytest.approx(0.6, abs=0.03)
    model = _llama(5)
    result = sparsify(model, _batches(), SparsityConfig(criterion="movement", sparsity=0.5, targets="blocks+head"))
    assert "lm_head.weight" in result.plan.weights and result.plan.sparsity == pytest.approx(0.5)
    assert all(p.grad is None for p in model.parameters())


def test_lora_base_layers_are_masked():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(6), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    result = sparsify(model, _batches(), SparsityConfig(criterion="wanda", pattern="2:4"))
    names = list(result.plan.weights)
    assert any("q_proj.base_layer.weight" in n for n in names) and len(names) == 14
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert is_nm(base != 0, 2, 4)


def test_errors_come_before_any_change():
    case = CASES["bert"]  # intermediate_size 37: not a multiple of 4
    model = case.build("eager")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        sparsify(model, None, SparsityConfig(pattern="2:4"))
    with pytest.raises(ValueError, match="needs calibration"):
        sparsify(model, None, SparsityConfig(criterion="wanda"))
    with pytest.raises(TypeError):
        sparsify(model, None, {"criterion": "magnitude"})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    informer = CASES["informer"]  # its layers are not a chain a replay can follow
    model = informer.build("eager")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use 'magnitude'"):
        sparsify(model, [informer.inputs(0)], SparsityConfig(criterion="sparsegpt"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- checkpoints ------------------------------------------------------------------------------


def test_zeros_in_place_reload_in_stock_transformers_and_compact_in_hfprune(tmp_path):
    model = _llama(7)
    sparsify(model, _batches(), SparsityConfig(criterion="sparsegpt", pattern="2:4"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    save_sparse(model, tmp_path / "plain")
    save_sparse(model, tmp_path / "compact", compact=True)
    plain = tmp_path / "plain"
    assert (plain / "notes.txt").read_text() == "mine" and not list(plain.glob("*.py"))
    assert "auto_map" not in json.loads((plain / "config.json").read_text())
    stock = T.AutoModelForCausalLM.from_pretrained(plain).eval()
    assert type(stock).__module__.startswith("transformers.")
    compact = hfprune.from_pretrained(tmp_path / "compact").eval()
    batch = _batches()[0]
    want = _logits(model, batch)
    assert torch.equal(_logits(stock, batch), want) and torch.equal(_logits(compact, batch), want)
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("plain", "compact")]
    assert sizes[1] < 0.8 * sizes[0]
    plan = json.loads((tmp_path / "compact" / "sparsity_plan.json").read_text())
    assert plan["compact"] and plan["weights"]["model.layers.0.mlp.down_proj.weight"]["sparsity"] == 0.5


def test_structured_then_sparse_compose_in_one_checkpoint(tmp_path):
    model = _llama(8)
    hfprune.apply_plan(model, {"layers": [{"heads": [0, 1], "ffn": list(range(40))},
                                          {"heads": [0, 1, 2, 3], "ffn": list(range(48))}]})
    sparsify(model, _batches(), SparsityConfig(criterion="wanda", pattern="2:4"))
    save_sparse(model, tmp_path / "both", compact=True)
    assert (tmp_path / "both" / "prune_plan.json").is_file()
    loaded = hfprune.from_pretrained(tmp_path / "both").eval()
    assert loaded.model.layers[0].mlp.down_proj.weight.shape == (32, 40)
    assert is_nm(loaded.model.layers[0].mlp.down_proj.weight != 0, 2, 4)
    batch = _batches()[0]
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    save_sparse(model, tmp_path / "plain-code")  # zeros in place, with the pruned model's remote code
    for name in ("plain-code", "both"):  # the compact one: its modeling_hfprune.py decompresses
        code = T.AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True).eval()
        assert type(code).__module__.startswith("transformers_modules.")
        assert torch.equal(_logits(code, batch), _logits(model, batch)), name


def test_cli_sparsify(tmp_path, capsys):
    from hfprune.pipeline.cli_sparsify import main

    model = _llama(9)
    model.save_pretrained(tmp_path / "dense")
    tok = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(99)}
    backend = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tok.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0",
                            eos_token="w1").save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 97 + 2}" for j in range(40)) for i in range(30)))
    rc = main([str(tmp_path / "dense"), "--output", str(tmp_path / "out"), "--criterion", "wanda",
               "--pattern", "2:4", "--data_files", str(text), "--max_length", "16", "--compact"])
    assert rc == 0 and "sparsity 0.5000" in capsys.readouterr().out
    loaded = hfprune.from_pretrained(tmp_path / "out")
    assert is_nm(loaded.model.layers[1].self_attn.o_proj.weight != 0, 2, 4)
    with pytest.raises(ValueError, match="need calibration text"):
        main([str(tmp_path / "dense"), "--output", str(tmp_path / "x"), "--criterion", "sparsegpt"])

"""Weight-level sparsity layer by layer from disk (``sparsify_sequential``) equals ``hfprune.sparsify`` in memory:
the same masks and bit-identical weights, plan and config, a checkpoint stock transformers reloads to the same
logits; one layer in memory at a time; nothing written on bad input or a failure half-way; the CLI's path choice."""

import gc
import json
import logging
import os
import weakref

import pytest
import torch
import transformers as T

import hfprune
from hfprune.pruning.lazy import LazyModel
from hfprune.pruning.sparsity import SparsityConfig, save_sparse, sparsify
from hfprune.pruning.sparsity import sequential as seq_module
from hfprune.pruning.sparsity.patterns import is_nm
from hfprune.pruning.sparsity.sequential import sparsify_sequential

from .cases import CASES


def _llama():
    config = T.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           attention_bias=True)
    return T.LlamaForCausalLM(config)


def _gpt2():
    config = T.GPT2Config(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return T.GPT2LMHeadModel(config)


BUILD = {"llama": _llama, "gpt2": _gpt2}


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 99, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding: both paths must leave it out of the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _dense(family, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "dense"
    BUILD[family]().save_pretrained(folder)
    return folder


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _listing(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _compare(family, tmp_path, settings, compact=False, **kwargs):
    folder = _dense(family, tmp_path)
    cls = type(BUILD[family]())
    dtype = kwargs.get("dtype")
    memory = cls.from_pretrained(folder, **({"dtype": dtype} if dtype else {})).eval()
    dense = {k: v.clone() for k, v in memory.state_dict().items()}
    expected = sparsify(memory, _batches(), SparsityConfig(**settings))
    # device="cpu": the in-memory model is on the CPU; a GPU's kernels would round differently
    got = sparsify_sequential(folder, _batches(), SparsityConfig(**settings), tmp_path / "seq", compact=compact,
                              keep_masks=True, device="cpu", **kwargs)
    assert sorted(got.masks) == sorted(expected.masks) and expected.masks
    for name, mask in expected.masks.items():
        assert torch.equal(mask, got.masks[name]), name
    assert got.plan.to_dict() == expected.plan.to_dict() and got.layer_sparsity == expected.layer_sparsity
    assert got.to_markdown() == expected.to_markdown()
    assert abs(got.plan.sparsity - SparsityConfig(**settings).resolved_sparsity) < 0.02
    loaded = (hfprune.from_pretrained if compact else cls.from_pretrained)(tmp_path / "seq").eval()
    want, have = memory.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(have)
    for key in want:
        assert torch.equal(want[key], have[key]), key  # bit-identical, not close
    assert any(not torch.equal(dense[k], want[k]) for k in want)  # not vacuous: weights were zeroed
    batch = _batches(1, seed=5)[0]
    assert torch.equal(_logits(memory, batch), _logits(loaded, batch))
    save_sparse(memory, tmp_path / "memory", compact=compact)
    for name in ("config.json", "sparsity_plan.json"):
        assert json.loads((tmp_path / "seq" / name).read_text()) == json.loads((tmp_path / "memory" / name).read_text())
    return got


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_equals_in_memory(family, criterion, pattern, tmp_path):
    _compare(family, tmp_path, dict(criterion=criterion, pattern=pattern))


@pytest.mark.parametrize("family, settings, compact", [
    ("llama", dict(criterion="wanda", sparsity=0.6, ratios="owl"), False),
    ("gpt2", dict(criterion="sparsegpt", sparsity=0.6, ratios="owl"), True),
    ("llama", dict(criterion="random", pattern="2:4", targets="blocks+head"), True),  # the head masked on its way
])
def test_owl_head_and_compact_equal_in_memory(family, settings, compact, tmp_path):
    got = _compare(family, tmp_path, settings, compact=compact)
    if settings.get("ratios") == "owl":
        assert len(set(got.layer_sparsity.values())) > 1  # the ratios do vary per layer
    if compact:
        assert json.loads((tmp_path / "seq" / "sparsity_plan.json").read_text())["compact"] is True


def test_bfloat16_with_offload_dir_equals_in_memory(tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "keep.txt").write_text("not ours")
    _compare("llama", tmp_path, dict(criterion="sparsegpt", pattern="2:4"), dtype=torch.bfloat16,
             offload_dir=offload)
    assert json.loads((tmp_path / "seq" / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(os.listdir(offload)) == ["keep.txt"]  # our activations folder is gone, the rest stays


@pytest.mark.parametrize("settings, loads, rest_loaded", [
    (dict(criterion="sparsegpt", pattern="2:4"), 3, True),
    (dict(criterion="wanda", ratios="owl"), 6, True),  # a dense OWL pass, then the pruning pass
    (dict(criterion="magnitude"), 3, False),  # data-free: one read per layer, no forward pass
])
def test_one_layer_at_a_time_and_never_the_embeddings(settings, loads, rest_loaded, tmp_path, monkeypatch):
    """Peak memory is one layer: no layer pass runs with the embeddings loaded, each layer is released before the
    next loads, freed memory goes back to the OS after every layer, and the tensors outside the layers are read one
    at a time at the end."""
    folder = _dense("llama", tmp_path)
    seen, alive, reads, rests, trims = [], [], [], [], []
    load_layer, rest_tensors, load_rest = LazyModel.load_layer, LazyModel.rest_tensors, LazyModel.load_rest

    def watch_layer(self, layers, index):
        seen.append(self.model.get_input_embeddings().weight.device.type)
        alive.append(sum(r() is not None for r in refs))  # layers loaded before and not yet released
        layer = load_layer(self, layers, index)
        refs.append(weakref.ref(layer))
        return layer

    def watch_rest(self, layers):
        for key, tensor in rest_tensors(self, layers):
            reads.append(key)
            yield key, tensor

    refs: list = []
    free = seq_module.return_freed_memory
    monkeypatch.setattr(LazyModel, "load_layer", watch_layer)
    monkeypatch.setattr(LazyModel, "rest_tensors", watch_rest)
    monkeypatch.setattr(LazyModel, "load_rest", lambda self, layers: (rests.append(1), load_rest(self, layers)))
    monkeypatch.setattr(seq_module, "return_freed_memory", lambda: (trims.append(len(seen)), free()))
    sparsify_sequential(folder, _batches(), SparsityConfig(**settings), tmp_path / "out")
    assert len(seen) == loads and set(seen) == {"meta"}
    assert alive == [0] * loads, alive  # never two layers at once
    assert trims == list(range(1, loads + 1)), trims  # right after each layer
    assert bool(rests) == rest_loaded
    assert "model.embed_tokens.weight" in reads and not [k for k in reads if k.startswith("model.layers.")]
    gc.collect()


def test_bad_input_refused_before_anything_is_written(tmp_path):
    folder = _dense("llama", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    before = _listing(out)
    batches = _batches()
    refusals = [
        (dict(criterion="movement"), batches, out, ValueError, "layer by layer runs magnitude, random, wanda"),
        (dict(criterion="wanda"), None, out, ValueError, "needs calibration batches"),
        (dict(criterion="magnitude", ratios="owl"), None, out, ValueError, "ratios='owl' needs calibration"),
        (dict(criterion="wanda", targets="blocks+head"), batches, out, ValueError, "use targets='blocks'"),
        (dict(criterion="magnitude", pattern="block:3x3"), None, out, ValueError, "not tiled by 3x3"),
        (dict(criterion="magnitude"), None, out / "notes.txt", FileExistsError, "it is a file"),
        (dict(criterion="magnitude"), None, out / "notes.txt" / "sub", NotADirectoryError, "is a file"),
        (dict(criterion="magnitude"), None, folder, ValueError, "is the model folder"),
        (dict(criterion="wanda"), [{"input_ids": torch.full((1, 4), 500)}], out, ValueError, "500"),
    ]
    for settings, data, target, error, words in refusals:
        with pytest.raises(error, match=words):
            sparsify_sequential(folder, data, SparsityConfig(**settings), target)
        assert _listing(out) == before, settings
    with pytest.raises(TypeError, match="SparsityConfig"):
        sparsify_sequential(folder, None, hfprune.PruningConfig(criterion="magnitude", params_ratio=0.8), out)
    vit = CASES["vit"].build()
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="does not support model_type 'vit'"):
        sparsify_sequential(tmp_path / "vit", None, SparsityConfig(), out)
    with pytest.raises(NotADirectoryError, match="offload_dir"):
        sparsify_sequential(folder, batches, SparsityConfig(criterion="wanda"), out, offload_dir=out / "notes.txt")
    assert _listing(out) == before
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(ValueError, match="needs calibration"):
        sparsify_sequential(folder, None, SparsityConfig(criterion="sparsegpt"), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_failure_half_way_leaves_the_output_as_it_was(tmp_path, monkeypatch):
    folder = _dense("llama", tmp_path)
    out = tmp_path / "out"
    sparsify_sequential(folder, None, SparsityConfig(criterion="magnitude"), out)  # an earlier save
    (out / "notes.txt").write_text("the user's")
    before = _listing(out)
    load_layer = LazyModel.load_layer

    def fail_at_two(self, layers, index):
        if index == 2:
            raise RuntimeError("disk gone")
        return load_layer(self, layers, index)

    monkeypatch.setattr(LazyModel, "load_layer", fail_at_two)
    with pytest.raises(RuntimeError, match="disk gone"):
        sparsify_sequential(folder, _batches(), SparsityConfig(criterion="sparsegpt", pattern="2:4"), out)
    assert _listing(out) == before  # the old checkpoint, the user's file, no staging leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def _tokenized_lm(tmp_path):
    tok = pytest.importorskip("tokenizers")
    folder = _dense("llama", tmp_path)
    vocab = {f"w{i}": i for i in range(99)}
    backend = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tok.pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0",
                              eos_token="w1").save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 97 + 2}" for j in range(40)) for i in range(30)))
    return folder, text


def test_cli_sequential_equals_in_memory_and_says_which_path(tmp_path, caplog, capsys, monkeypatch):
    from hfprune.pipeline.cli_sparsify import main

    folder, text = _tokenized_lm(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # in memory runs on the CPU: so do the layers
    caplog.set_level(logging.INFO, logger="hfprune")
    flags = ["--criterion", "sparsegpt", "--pattern", "2:4", "--data_files", str(text), "--max_length", "16",
             "--calibration_rows", "12"]
    assert main([str(folder), "--output", str(tmp_path / "seq"), *flags, "--sequential"]) == 0
    assert "layer-by-layer path: --sequential" in caplog.text and "layer by layer" in capsys.readouterr().out
    assert main([str(folder), "--output", str(tmp_path / "mem"), *flags]) == 0  # small: in memory
    assert "in-memory path: the weights" in caplog.text
    a, b = T.AutoModelForCausalLM.from_pretrained(tmp_path / "seq"), hfprune.from_pretrained(tmp_path / "mem")
    for key, value in b.state_dict().items():
        assert torch.equal(value, a.state_dict()[key]), key
    assert is_nm(a.model.layers[2].mlp.down_proj.weight != 0, 2, 4)
    assert (tmp_path / "seq" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "seq" / "sparsity_plan.json").read_text()) == \
        json.loads((tmp_path / "mem" / "sparsity_plan.json").read_text())
    assert main([str(folder), "--output", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0  # implies sequential
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="drop --no-sequential"):
        main([str(folder), "--output", str(tmp_path / "x"), "--no-sequential", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="--sequential: criterion 'movement'"):
        main([str(folder), "--output", str(tmp_path / "x"), "--criterion", "movement", "--sequential", *flags[4:]])
    with pytest.raises(ValueError, match="dtype='int8'"):
        main([str(folder), "--output", str(tmp_path / "x"), "--dtype", "int8"])
    assert not (tmp_path / "x").exists()

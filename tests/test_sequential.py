"""Sequential (layer-by-layer) pruning from disk equals in-memory pruning: same plan, same weights, same outputs,
for every family it supports and every layer-wise criterion and recovery; it writes nothing on bad input."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfprune
from hfprune.pruning import sequential as sequential_module
from hfprune.pruning.sequential import SEQUENTIAL_MODEL_TYPES, prune_sequential, sequential_problem

from .cases import CASES

SETTINGS = {
    "fluctuation-obs-uniform": dict(criterion="fluctuation", params_ratio=0.8, scope="uniform", recovery="obs"),
    "activation-global": dict(criterion="activation", macs_ratio=0.7, scope="global", recovery="none"),
    "magnitude-obs": dict(criterion="magnitude", params_ratio=0.8, scope="global", recovery="obs"),
    "fluctuation-bias": dict(criterion="fluctuation", params_ratio=0.8, scope="uniform", bias_compensation=True),
    "activation-ratio-obs": dict(criterion="activation", head_ratio=0.5, ffn_ratio=0.6, recovery="obs"),
}


def _dense(model_type, tmp_path):
    torch.manual_seed(0)
    case = CASES[model_type]
    model = case.build().eval()
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    batches = [case.inputs(1), case.inputs(2)]  # padded rows: the masks must leave them out in both paths
    return type(model), folder, batches


def _compare(model_type, tmp_path, settings, **kwargs):
    cls, folder, batches = _dense(model_type, tmp_path)
    settings = {"recovery_examples": 3, **settings}  # cuts the second batch: it runs on its own in both paths
    memory = cls.from_pretrained(folder).eval()
    expected = hfprune.prune(memory, batches, hfprune.PruningConfig(**settings))
    out = tmp_path / "sequential"
    result = prune_sequential(folder, batches, hfprune.PruningConfig(**settings), out, **kwargs)
    assert result.plan == expected.plan
    assert result.recovery == expected.recovery
    assert result.after.params == expected.after.params and result.before.params == expected.before.params
    loaded = hfprune.from_pretrained(out).eval()
    want, got = memory.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    with torch.no_grad():
        a, b = memory(**batches[0]), loaded(**batches[0])
    assert torch.equal(a.logits, b.logits)
    memory.save_pretrained(tmp_path / "memory")
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    return out


@pytest.mark.parametrize("model_type", SEQUENTIAL_MODEL_TYPES)
@pytest.mark.parametrize("setting", ["fluctuation-obs-uniform", "activation-global"])
def test_equals_in_memory_every_family(model_type, setting, tmp_path):
    _compare(model_type, tmp_path, SETTINGS[setting])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("setting", ["magnitude-obs", "fluctuation-bias", "activation-ratio-obs"])
def test_equals_in_memory_every_setting(model_type, setting, tmp_path):
    _compare(model_type, tmp_path, SETTINGS[setting])


def test_offload_dir_shards_and_extra_files(tmp_path):
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "mine.txt").write_text("not hfprune's")
    out = _compare("llama", tmp_path, SETTINGS["fluctuation-obs-uniform"], offload_dir=offload,
                   stage=lambda folder, result: (folder / "notes.txt").write_text(str(result.after.params)))
    assert sorted(os.listdir(offload)) == ["mine.txt"]  # its own activation folder removed, nothing else
    names = sorted(os.listdir(out))
    assert "notes.txt" in names and not [n for n in names if n.startswith(".")]
    shards = {}
    for key, shard in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].items():
        shards.setdefault(shard, set()).add(key.split(".")[2] if key.startswith("model.layers.") else key)
    assert sorted(shards) == sorted(n for n in names if n.startswith("model-"))
    # one shard per layer, and one per tensor outside the layers: the embeddings and head are never held together
    assert sorted(len(v) for v in shards.values()) == [1] * len(shards)
    assert sum(v <= {"0", "1", "2"} for v in shards.values()) == 3
    assert {k for v in shards.values() for k in v} >= {"model.embed_tokens.weight", "model.norm.weight"}


def test_bfloat16_equals_in_memory(tmp_path):
    cls, folder, batches = _dense("llama", tmp_path)
    settings = dict(criterion="fluctuation", params_ratio=0.8, scope="uniform", recovery="obs")
    memory = cls.from_pretrained(folder, dtype=torch.bfloat16).eval()
    expected = hfprune.prune(memory, batches, hfprune.PruningConfig(**settings))
    result = prune_sequential(folder, batches, hfprune.PruningConfig(**settings), tmp_path / "out", dtype="bfloat16")
    assert result.plan == expected.plan
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain checkpoint
    assert loaded.dtype == torch.bfloat16
    for key, value in memory.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


@pytest.mark.parametrize("settings, words", [
    (dict(criterion="fisher", params_ratio=0.8), "in-memory path"),
    (dict(criterion="taylor", params_ratio=0.8), "in-memory path"),
    (dict(criterion="fluctuation", latency_ratio=0.8), "latency_ratio"),
    (dict(criterion="fluctuation", params_ratio=0.8, recovery="lstsq"), "recovery 'lstsq'"),
])
def test_refused_before_anything_is_written(settings, words, tmp_path):
    config = hfprune.PruningConfig(**settings)
    assert words in sequential_problem(config)
    _, folder, batches = _dense("llama", tmp_path)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        prune_sequential(folder, batches, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_refused_before_anything_is_written(tmp_path):
    _, folder, batches = _dense("llama", tmp_path)
    config = hfprune.PruningConfig(criterion="fluctuation", params_ratio=0.8, scope="uniform")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="offload_dir"):
        prune_sequential(folder, batches, config, tmp_path / "out", offload_dir=blocker)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_sequential(folder, None, config, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        prune_sequential(tmp_path, batches, config, tmp_path / "out")
    vit = CASES["vit"].build()
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="does not support model_type 'vit'"):
        prune_sequential(tmp_path / "vit", [CASES["vit"].inputs(0)], config, tmp_path / "out")
    with pytest.raises(hfprune.PlanError):
        prune_sequential(folder, batches, hfprune.PruningConfig(criterion="fluctuation", params_ratio=0.01,
                                                                scope="uniform"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_depth_equals_in_memory(model_type, tmp_path):
    from hfprune.pruning.depth import block_influence, depth_plan
    from hfprune.pruning.sequential_depth import depth_sequential

    cls, folder, batches = _dense(model_type, tmp_path)
    memory = cls.from_pretrained(folder).eval()
    influence = block_influence(memory, batches)
    expected = depth_plan(memory, influence=influence, num_drop=1)
    hfprune.apply_plan(memory, expected)
    plan, got, _, after = depth_sequential(folder, batches, tmp_path / "out", num_drop=1)
    assert torch.equal(got, influence) and plan == expected
    loaded = hfprune.from_pretrained(tmp_path / "out").eval()
    want, have = memory.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(have) and all(torch.equal(want[k], have[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(memory(**batches[0]).logits, loaded(**batches[0]).logits)
    assert after.params == sum(p.numel() for p in memory.parameters())


@pytest.mark.parametrize("setting", ["fluctuation-obs-uniform", "fluctuation-bias"])
def test_no_layer_pass_holds_the_embeddings(setting, tmp_path, monkeypatch):
    """Peak memory grows with one layer, not with the vocabulary: the embeddings are back on the meta device
    before the first layer is loaded, and the tensors outside the layers are read one at a time at the end."""
    from hfprune.pruning.lazy import LazyModel

    _, folder, batches = _dense("llama", tmp_path)
    seen, reads = [], []
    load_layer, rest_tensors = LazyModel.load_layer, LazyModel.rest_tensors

    def watch_layer(self, layers, index):
        seen.append(self.model.get_input_embeddings().weight.device.type)
        return load_layer(self, layers, index)

    def watch_rest(self, layers):
        for key, tensor in rest_tensors(self, layers):
            reads.append(key)
            yield key, tensor

    trims = []
    monkeypatch.setattr(LazyModel, "load_layer", watch_layer)
    monkeypatch.setattr(LazyModel, "rest_tensors", watch_rest)
    # freed memory goes back to the OS after every layer of both passes (glibc would keep it: RSS grows with depth)
    monkeypatch.setattr(sequential_module, "return_freed_memory", lambda: trims.append(len(seen)))
    settings = {"recovery_examples": 3, **SETTINGS[setting]}
    prune_sequential(folder, batches, hfprune.PruningConfig(**settings), tmp_path / "out")
    assert len(seen) == 2 * 3 and set(seen) == {"meta"}  # statistics and reconstruction pass, 3 layers each
    assert trims == [1, 2, 3, 4, 5, 6], trims  # right after each layer
    assert "model.embed_tokens.weight" in reads and not [k for k in reads if k.startswith("model.layers.")]

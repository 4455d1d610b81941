# Copyright hfprune contributors. Apache-2.0.
"""Uniform width pruning of a Llama-style decoder (whole GQA key/value groups and SwiGLU neurons) to a plain
checkpoint that stock ``AutoModelForCausalLM.from_pretrained(dir)`` loads with no remote code.

A tiny random Llama (4 query heads in 2 key/value groups) keeps the run to seconds; the same calls prune
SmolLM2-135M or any Llama, Mistral, Qwen2/3 checkpoint (docs/llm.md). Usage::

    python examples/prune_llm.py
    python examples/prune_llm.py --macs-ratio 0.7 --output-dir tiny-llama-pruned
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hfprune

parser = argparse.ArgumentParser()
parser.add_argument("--macs-ratio", type=float, default=0.5)
parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
args = parser.parse_args()

torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128)).eval()
calibration = [{"input_ids": torch.randint(0, 256, (4, 32))} for _ in range(4)]  # use real text for a real model

# scope="uniform": the same number of KV groups and neurons in every layer, so the stock config describes it.
config = hfprune.PruningConfig(criterion="fluctuation", macs_ratio=args.macs_ratio, scope="uniform", seq_len=32,
                               recovery="obs")  # structured OBS reconstructs each pruned projection's output
print(hfprune.prune(model, calibration, config).table())
print(f"config: {model.config.num_attention_heads} heads, {model.config.num_key_value_heads} KV heads, "
      f"FFN {model.config.intermediate_size}")

prompt = torch.randint(0, 256, (1, 8))
with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
    out_dir = args.output_dir or tmp
    model.save_pretrained(out_dir)
    plain = "auto_map" not in json.loads((Path(out_dir) / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()  # no trust_remote_code: a plain checkpoint
    same = torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))
print(f"plain checkpoint: {plain}; reloaded greedy tokens {'identical' if same else 'DIFFERENT'}")
raise SystemExit(0 if plain and same else 1)

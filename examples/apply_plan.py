# Copyright hfprune contributors. Apache-2.0.
"""Prune a BERT model by hand with ``hfprune.apply_plan``, save it, reload it without hfprune, compare outputs.

Usage::

    python examples/apply_plan.py                       # a tiny random BERT built from a config (seconds)
    python examples/apply_plan.py --model-dir DIR       # any local BERT-family directory, e.g. all-MiniLM-L6-v2
    python examples/apply_plan.py --output-dir pruned   # keep the checkpoint (default: a temporary folder)
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModel, BertConfig, BertModel

import hfprune
from hfprune.core.cost import estimate

parser = argparse.ArgumentParser()
parser.add_argument("--model-dir")
parser.add_argument("--output-dir")
args = parser.parse_args()
torch.manual_seed(0)
model = (AutoModel.from_pretrained(args.model_dir) if args.model_dir else
         BertModel(BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)))
model.eval()
c, dense_params = model.config, sum(p.numel() for p in model.parameters())

# Keep-indices per layer: the first half of the heads and two thirds of the FFN neurons; drop the last layer.
keep = {"heads": list(range(c.num_attention_heads // 2)), "ffn": list(range(2 * c.intermediate_size // 3))}
plan = {"layers": [keep] * (c.num_hidden_layers - 1) + [{"drop": True}]}
print(estimate(model, plan).table())  # what the plan costs, before anything is sliced
hfprune.apply_plan(model, plan)  # slices the weights in place
print(f"parameters: {dense_params:,} -> {sum(p.numel() for p in model.parameters()):,}")

batch = {"input_ids": torch.randint(100, 1000, (2, 16))}
with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
    out_dir = args.output_dir or tmp
    model.save_pretrained(out_dir)  # weights + modeling_hfprune.py + prune_plan.json (BERT needs remote code here)
    reloaded = AutoModel.from_pretrained(out_dir, trust_remote_code=True).eval()  # works without hfprune too
    same = torch.equal(reloaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
print(f"reloaded from {out_dir}: outputs {'identical' if same else 'DIFFERENT'}")
raise SystemExit(0 if same else 1)

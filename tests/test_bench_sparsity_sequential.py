"""``benchmarks/sparsity_sequential.py`` keeps working: on a tiny random Llama saved to disk, its two child processes
(in memory, layer by layer) give bit-identical checkpoints, the comparison notices a changed weight, and the table
renders."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file, save_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from sparsity_sequential import identical, measure, table  # noqa: E402


def test_benchmark_core_on_tiny_llama(tmp_path):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    calib = tmp_path / "calibration.safetensors"
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(calib))

    rows = measure("tiny", tmp_path / "dense", calib, "2:4", tmp_path / "out",
                   [sys.executable, str(BENCH / "sparsity_sequential.py")])
    assert [r["path"] for r in rows] == ["memory", "sequential"] and all(r["rc"] == 0 for r in rows)
    assert rows[1]["identical"] is True and rows[1]["tensors"] == 2 * 9 + 3, rows[1]
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 and r["rss_gib"] > 0 and r["cpu"] > 0 for r in rows)
    text = table(rows)
    assert text.count("\n") == 3 and "| tiny | 2 |" in text and "| 2:4 | 4 x 16 | sequential |" in text
    assert "yes (21 tensors)" in text

    # the comparison can fail: one changed weight in a copy of the sequential output
    outs = sorted(p for p in (tmp_path / "out").iterdir())
    copy = tmp_path / "changed"
    shutil.copytree(outs[1], copy)
    shard = next(p for p in sorted(copy.glob("*.safetensors")) if "model.layers.1.mlp.up_proj.weight" in
                 load_file(str(p)))
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    got = identical(outs[0], copy)
    assert got["identical"] is False and got["differing"] == ["model.layers.1.mlp.up_proj.weight"]

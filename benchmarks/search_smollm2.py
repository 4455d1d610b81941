"""SmolLM2-135M on BBC News: searched shapes against each axis alone, at fractions of ALL parameters kept,
retraining-free (structured OBS on the finalists' heads and FFN neurons, where the shape prunes them).

    PYTHONPATH=. python benchmarks/search_smollm2.py
    PYTHONPATH=. python benchmarks/search_smollm2.py --budgets 0.8 --test-blocks 8 --quick

Per budget (``--budgets``, fractions of all parameters kept), four rows, each ``hfprune.pruning.search.search``:
``depth`` alone (layers dropped by block influence), ``hidden`` alone, ``heads+FFN`` width (uniform key/value groups
and FFN width), and ``searched``: depth x hidden x key/value groups on a grid, FFN width solved for the budget.
Candidates are scored on ``--eval-blocks`` held-out calibration blocks; only each row's chosen model is tested on the
``--test-blocks`` test blocks, saved and reloaded with stock ``AutoModelForCausalLM`` (plain checkpoint check).
The per-axis scores and candidate scores are cached under ``--cache-dir``, so the rows and budgets share one scoring
pass per axis. Writes ``benchmarks/results/search_smollm2.{md,json,png}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
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

from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402
from hfprune.pruning.search import SearchConfig, search  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # paths below are relative to the repository, wherever this runs
ROWS = {"searched": ("depth", "hidden", "heads", "ffn"), "heads+FFN": ("heads", "ffn"), "depth": ("depth",),
        "hidden": ("hidden",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.8,0.6", help="fractions of all parameters kept")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    p.add_argument("--criterion", default="fluctuation", help="heads/FFN criterion")
    p.add_argument("--recovery", default="obs", choices=("none", "obs"))
    p.add_argument("--finalists", type=int, default=1)
    p.add_argument("--per-layer", action="store_true", help="the searched row also builds per-layer candidates")
    p.add_argument("--layer-ladder", default="0.875,0.75,0.625,0.5,0.375,0.25", help="per-layer FFN fractions")
    p.add_argument("--no-per-kind", dest="per_kind", action="store_false",
                   help="recover only the best --finalists (not also the best of every kind of shape)")
    p.add_argument("--recovery-examples", type=int, default=16)
    p.add_argument("--depth-grid", default="1,0.9,0.8,0.7")
    p.add_argument("--hidden-grid", default="1,0.9")
    p.add_argument("--heads-grid", default="1,0.67")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--calibration-blocks", type=int, default=24)
    p.add_argument("--eval-blocks", type=int, default=6, help="held-out calibration blocks scoring the candidates")
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default="outputs/search_smollm2/cache")
    p.add_argument("--out", default="benchmarks/results/search_smollm2")
    p.add_argument("--quick", action="store_true", help="smoke run: do not write the results files")
    p.add_argument("--merge", nargs="+", default=None, help="write --out from these runs' JSON files (rows in "
                   "order, runs' commands listed) instead of running; the other flags must be the runs' own")
    return p.parse_args(argv)


def grid(text: str) -> list:
    return [float(x) for x in text.split(",") if x.strip()]


def render(args, rows: list, dense: dict, meta: dict) -> str:
    runs = "; ".join(f"`{r['command']}` (load average at start {r['load'][0]:.2f} / {r['load'][1]:.2f} over 1 / "
                     f"5 min, {r['minutes']:.1f} min)" for r in meta["runs"])
    lines = ["# SmolLM2-135M-Instruct: searched shapes vs single axes, fractions of ALL parameters kept, "
             "retraining-free", "",
             f"Commands: {runs}", "",
             f"Machine: {meta['machine']} (shared with other jobs: times are inflated by them; perplexities are "
             "not affected).", "",
             f"Data: BBC News split by article with seed 0 (as benchmarks/smollm2.py); axes scored on "
             f"{args.calibration_blocks - args.eval_blocks} calibration blocks of {args.block_size} tokens, candidates "
             f"scored on the {args.eval_blocks} held-out calibration blocks after them; test perplexity (the "
             f"table) on the first {args.test_blocks} test blocks ({dense['tokens']:,} predicted tokens). Heads/FFN "
             f"criterion: {args.criterion}; recovery of each row's finalist(s): {args.recovery} "
             f"({args.recovery_examples} calibration blocks; it reconstructs pruned heads/FFN blocks, so depth-only "
             "and hidden-only rows are unchanged by it). Searched grid: depth "
             f"{args.depth_grid}, hidden {args.hidden_grid}, KV groups {args.heads_grid}; FFN width solved for the "
             "budget.", "",
             "| budget (params kept) | row | shape | parameters | of dense | candidates | held-out ppl | test ppl | "
             "vs dense | plain checkpoint | prune time (s) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
             f"| 1.0 | dense | {meta['dense_shape']} | {dense['params']:,} | 100.0% |  | {dense['heldout']:.2f} | "
             f"{dense['perplexity']:.2f} |  | yes |  |"]
    for r in rows:
        share = r["params"] / dense["params"]
        lines.append(f"| {r['budget']} | {r['row']} | {r['shape']} | {r['params']:,} | {share:.1%} | {r['candidates']} "
                     f"| {r['heldout']:.2f} | {r['test_ppl']:.2f} | "
                     f"{r['test_ppl'] / dense['perplexity'] - 1:+.1%} | {r['plain']} | {r['seconds']:.0f} |")
    lines += ["", "Held-out ppl: the chosen candidate's score on the held-out calibration blocks (after the recovery "
              "where one ran). Candidates: shapes on the row's grid meeting the budget (scored now / from cache "
              "in the JSON). Prune time: the row's search (scoring passes cached from earlier rows are not "
              "re-run, so the first row of a budget pays for them) plus building the chosen model."]
    return "\n".join(lines)


def plot(rows: list, dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"depth": "s", "hidden": "^", "heads+FFN": "o", "searched": "*"}
    for name in ROWS:
        pts = [r for r in rows if r["row"].split(" (")[0] == name]
        if pts:
            ax.scatter([r["params"] / 1e6 for r in pts], [r["test_ppl"] for r in pts], marker=markers[name],
                       s=160 if name == "searched" else 60, label=name)
    ax.axhline(dense["perplexity"], ls="--", c="gray", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test perplexity (BBC, retraining-free)")
    ax.set_title("SmolLM2-135M: searched shape vs single axes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(args) -> None:
    """One table from several runs (e.g. budgets run as separate processes), without running anything."""
    rows, records, runs, dense, meta = [], [], [], None, None
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        old = data["meta"]
        if "runs" not in old:  # written before runs were listed: one run, launched with PYTHONPATH=. as documented
            command = old["command"] if old["command"].startswith("PYTHONPATH") else "PYTHONPATH=. " + old["command"]
            old = {**old, "runs": [{"command": command, "load": old["load"], "minutes": old["minutes"]}]}
        dense, meta = dense or data["dense"], meta or old
        runs += old["runs"]
        for record in data["rows"]:
            finalists = record["search"]["config"]["finalists"]
            if record["row"] == "searched":  # how many finalists were rebuilt with the recovery and compared
                recovered = sum("recovered_score" in c for c in record["search"]["candidates"])
                label = (f"{recovered} recovered: best {finalists} + best of each kind"
                         if record["search"]["config"].get("finalist_per_kind") else
                         f"{finalists} finalist{'s' if finalists > 1 else ''}")
                if record["search"]["config"].get("per_layer"):
                    label += "; per-layer candidates too"
                record = {**record, "row": f"searched ({label})"}
            if "not a plain checkpoint" in record.get("plain", ""):  # per-layer widths: the generated modeling code
                record = {**record, "plain": "no (remote code)"}
            records.append(record)
            rows.append({k: v for k, v in record.items() if k != "search"})
    meta = {**meta, "runs": runs}
    out = ROOT / args.out
    out.with_suffix(".md").write_text(render(args, rows, dense, meta) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"dense": dense, "meta": meta, "rows": records}, indent=1))
    plot(rows, dense, out.with_suffix(".png"))
    print(render(args, rows, dense, meta))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()
    given = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=. python benchmarks/search_smollm2.py" + "".join(" " + a for a in given)
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    data = bbc_news(seed=0)
    calib = lm_blocks(data["calibration"], tokenizer, args.block_size, max_blocks=args.calibration_blocks)
    n_cal = len(calib) - args.eval_blocks
    calibration = batches(calib.select(range(n_cal)), 4)
    held_out = batches(calib.select(range(n_cal, len(calib))), 4)
    test = lm_blocks(data["test"], tokenizer, args.block_size, max_blocks=args.test_blocks)
    test_batches = batches(test, 8)
    probe = {"input_ids": test[:2]["input_ids"][:, :64]}
    t = time.perf_counter()
    dense = perplexity(dense_model, test_batches)
    dense.update(params=n_params(dense_model), heldout=perplexity(dense_model, held_out)["perplexity"])
    print(f"dense: test ppl {dense['perplexity']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    cfg = dense_model.config
    run = {"command": command, "load": load, "minutes": 0.0}
    meta = {"runs": [run], "machine": machine(),
            "dense_shape": f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
                           f"heads / {cfg.num_key_value_heads} KV, FFN {cfg.intermediate_size}"}
    rows, records = [], []
    out = ROOT / args.out
    for budget in grid(args.budgets):
        for name in args.rows.split(","):
            axes = ROWS[name]
            config = SearchConfig(ratio=budget, budget="params", axes=axes, criterion=args.criterion,
                                  grid={"depth": grid(args.depth_grid), "hidden": grid(args.hidden_grid),
                                        "heads": grid(args.heads_grid)},
                                  eval_examples=args.eval_blocks, recovery=args.recovery, finalists=args.finalists,
                                  finalist_per_kind=args.per_kind, recovery_examples=args.recovery_examples,
                                  per_layer=args.per_layer and name == "searched", layer_ladder=grid(args.layer_ladder),
                                  cache_dir=str(ROOT / args.cache_dir))
            model = copy.deepcopy(dense_model)
            t = time.perf_counter()
            result = search(model, calibration, config, eval_data=held_out)
            seconds = time.perf_counter() - t
            ppl = perplexity(model, test_batches)["perplexity"]
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    check_plain(model, probe, Path(tmp) / "m")
                    plain = "yes"
                except Exception as err:  # noqa: BLE001 - reported in the table as it is
                    plain = f"no ({str(err)[:60]})"
            best = result.best
            row = {"budget": budget, "row": name, "shape": best["label"], "params": n_params(model),
                   "candidates": len(result.rows), "heldout": best.get("recovered_score", best["score"]),
                   "test_ppl": ppl, "plain": plain, "seconds": seconds}
            rows.append(row)
            records.append({**row, "search": result.to_dict(plans=False)})
            print(f"{budget} {name}: {best['label']} test ppl {ppl:.3f} ({seconds:.0f} s "
                  f"{result.extra['timings']}; passes run "
                  f"{result.passes_run}, cached {result.passes_cached}; {result.evaluated} scored, "
                  f"{result.eval_cached} cached)", flush=True)
            del model
            if not args.quick:  # written after every row: an interrupted run keeps what finished
                run["minutes"] = (time.perf_counter() - started) / 60
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".md").write_text(render(args, rows, dense, meta) + "\n")
                out.with_suffix(".json").write_text(json.dumps({"dense": dense, "meta": meta, "rows": records},
                                                               indent=1, default=float))
                plot(rows, dense, out.with_suffix(".png"))
    run["minutes"] = (time.perf_counter() - started) / 60
    print(render(args, rows, dense, meta))


if __name__ == "__main__":
    main()

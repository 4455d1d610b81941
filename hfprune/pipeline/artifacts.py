# Copyright hfprune contributors. Apache-2.0.
"""What ``hfprune run`` and ``hfprune sweep`` leave on disk: the file names, the schema of
``hfprune_results.json`` and of ``sweep.json``, and the markdown tables made from them.

Everything that reads or writes these files (run, sweep, card, report, hub) takes the names from here, so this
module imports nothing else of the pipeline. Reading is lenient: a results file from an older hfprune, or the
partial results :func:`hfprune.pipeline.report.checkpoint_results` measures from a bare checkpoint, may lack keys.

Example:

```python
>>> from hfprune.pipeline.artifacts import sweep_table
>>> print(sweep_table({"key": "macs_ratio", "dense": {"metrics": {"accuracy": 0.9}, "macs": 100},
...                    "points": [{"ratio": 0.5, "metrics": {"accuracy": 0.85}, "macs": 50, "latency_ms": 6.0,
...                                "dense_latency_ms": 10.0}]}))
| macs_ratio | accuracy | MACs / dense | latency / dense |
|---:|---:|---:|---:|
| dense | 0.9000 | 1.00 | 1.00 |
| 0.50 | 0.8500 | 0.50 | 0.60 |
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

# In a checkpoint folder written by `hfprune run` (beside the weights, config and prune_plan.json):
RESULTS_FILE = "hfprune_results.json"
RECIPE_FILE = "recipe.yaml"
SCORES_FILE = "importance.safetensors"
CARD_FILE = "README.md"
PLOTS_DIR = "plots"
# `hfprune sweep` writes into `<output dir>-sweep`, beside the checkpoint folder and never in it
SWEEP_SUFFIX = "-sweep"
SWEEP_FILE = "sweep.json"
SWEEP_TABLE_FILE = "sweep.md"
PARETO_PLOT = "pareto.png"


# ---- hfprune_results.json ------------------------------------------------------------------------------------


class Stages(TypedDict, total=False):
    before: dict  # metric name -> value (or an int for params/MACs)
    after: dict


class LayerRow(TypedDict):
    """Kept and dense heads/neurons of one layer, by block name (``heads``, ``ffn``, ...); a dropped layer keeps 0."""

    stack: str
    index: int
    dropped: bool
    dense_heads: dict
    heads: dict
    dense_neurons: dict
    neurons: dict


class Latency(TypedDict):
    before_ms: float  # medians of the timed rounds
    after_ms: float
    speedup: float
    before_all_ms: list
    after_all_ms: list
    batch_size: int
    seq_len: int
    rounds: int
    hardware: str


class Results(TypedDict, total=False):
    """``hfprune_results.json``: what a run measured. A plain dict on disk and in memory, so older files load as
    they are; the model card and the plots read it."""

    hfprune_version: str
    recipe: str  # the recipe's name
    method: str  # oneshot / gradual
    task: str  # a registered task name (hfprune.pipeline.tasks)
    base_model: str | None  # a Hub id, or None: the card links to it
    model_path: str  # the recipe's model.path, as written
    base_model_id: str | None
    base_model_dir: str  # where the dense model was loaded from
    model_type: str
    dataset: str
    eval: dict  # {"split": str, "examples": int, "f1_average": str, "mase_periodicity": int}
    pruning: dict  # PruningConfig.to_dict()
    distilled: bool
    metrics: Stages
    params: Stages
    macs: dict  # Stages plus "seq_len"
    layers: list  # LayerRow
    recovery: str  # one-shot runs: the recovery that ran
    latency: Latency
    seconds: float
    plots: list  # PNG paths relative to the checkpoint folder
    hub_url: str


def write_results(directory: Path, results: Results) -> Path:
    path = Path(directory) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def read_results(directory: Path) -> Results:
    """The results file of a checkpoint folder (``FileNotFoundError`` if it has none)."""
    return json.loads((Path(directory) / RESULTS_FILE).read_text())


def layer_rows(before, after, plan) -> list:
    """Per layer: dense and kept heads/neurons (0 for a dropped layer), from the costs
    (:func:`hfprune.core.cost.estimate`) of the dense and the pruned model; for the card and the plots."""
    kept = {(c.stack, c.index): c for c in after.layers}
    rows = []
    for c in before.layers:
        k = kept.get((c.stack, c.index))
        rows.append({"stack": c.stack, "index": c.index, "dropped": k is None,
                     "dense_heads": dict(c.heads), "heads": dict(k.heads) if k else {n: 0 for n in c.heads},
                     "dense_neurons": dict(c.neurons),
                     "neurons": dict(k.neurons) if k else {n: 0 for n in c.neurons}})
    return rows


def scores_to_tensors(scores: dict) -> dict:
    """``{(stack, i, block): tensor}`` -> ``{"stack.i.block": tensor}``: the keys of :data:`SCORES_FILE`."""
    return {f"{k[0]}.{k[1]}.{k[2]}": v.detach().float().cpu().contiguous() for k, v in scores.items()}


# ---- sweep.json -----------------------------------------------------------------------------------------------


class SweepPoint(TypedDict):
    ratio: float  # the budget (pruning.<key>)
    metrics: dict
    macs: int
    params: int
    latency_ms: float  # median over the rounds; dense timed in the same rounds
    dense_latency_ms: float


class SweepResults(TypedDict, total=False):
    dense: dict  # {"metrics": {...}, "macs": int, "params": int}
    points: list  # SweepPoint, by ratio
    key: str  # macs_ratio, params_ratio or latency_ratio
    hardware: str
    criterion: str
    recovery: str
    plot: str  # the Pareto plot's path (not in the file: added after writing it)


# ---- markdown tables ------------------------------------------------------------------------------------------


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def metric_title(name: str, eval_record: dict) -> str:
    """A metric's name as the tables and the card show it: MASE with the seasonal lag it scaled by."""
    if name == "mase" and "mase_periodicity" in eval_record:
        return f"mase (m={eval_record['mase_periodicity']})"
    return name


def results_table(r: Results) -> str:
    """The before/after markdown table: metrics, parameters, MACs and measured latency."""
    rows = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    split = r.get("eval", {}).get("split", "eval")
    for name, before in r["metrics"]["before"].items():
        after = r["metrics"]["after"].get(name)
        rows.append(f"| {split} {metric_title(name, r.get('eval', {}))} | {before:.4f} | {after:.4f} | |")
    p, m = r["params"], r["macs"]
    rows.append(f"| parameters | {p['before']:,} | {p['after']:,} | {_ratio(p['after'], p['before'])} |")
    rows.append(f"| MACs, transformer layers, seq {m['seq_len']} | {m['before']:,} | {m['after']:,} | "
                f"{_ratio(m['after'], m['before'])} |")
    lat = r.get("latency")
    if lat:
        rows.append(f"| latency, batch {lat['batch_size']} x {lat['seq_len']}, median of {lat['rounds']} | "
                    f"{lat['before_ms']:.1f} ms | {lat['after_ms']:.1f} ms | "
                    f"{_ratio(lat['after_ms'], lat['before_ms'])} |")
        rows.append(f"\nLatency measured on {lat['hardware']}; speedup {lat['speedup']:.2f}x.")
    return "\n".join(rows)


def layer_label(row: LayerRow) -> str:
    return f"{row['stack']}[{row['index']}]" if row["stack"] != "layers" else f"layer {row['index']}"


def layer_table(layers: list) -> str:
    """Markdown: per layer, kept/dense heads and neurons."""
    blocks = list(dict.fromkeys(n for r in layers for n in (*r["dense_heads"], *r["dense_neurons"])))
    rows = ["| layer | " + " | ".join(blocks) + " |", "|---|" + "---:|" * len(blocks)]
    for r in layers:
        cells = []
        for b in blocks:
            field = "heads" if b in r["dense_heads"] else "neurons"
            kept, dense = r[field], r[f"dense_{field}"]
            cells.append("dropped" if r["dropped"] else f"{kept.get(b, 0)} / {dense.get(b, 0)}")
        rows.append(f"| {layer_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_table(s: SweepResults) -> str:
    """Markdown: the first metric, MACs and latency relative to dense, per budget."""
    metric = next(iter(s["dense"]["metrics"]), None)
    rows = [f"| {s['key']} | {metric} | MACs / dense | latency / dense |", "|---:|---:|---:|---:|",
            f"| dense | {s['dense']['metrics'].get(metric, float('nan')):.4f} | 1.00 | 1.00 |"]
    for p in s["points"]:
        rows.append(f"| {p['ratio']:.2f} | {p['metrics'].get(metric, float('nan')):.4f} | "
                    f"{p['macs'] / s['dense']['macs']:.2f} | {p['latency_ms'] / p['dense_latency_ms']:.2f} |")
    return "\n".join(rows)

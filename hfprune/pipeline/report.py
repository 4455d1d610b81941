# Copyright hfprune contributors. Apache-2.0.
"""Tables and PNG plots of a pruned checkpoint: kept structure per layer, importance heatmaps, and the
accuracy-vs-cost Pareto curve of a sweep. ``hfprune report DIR`` draws them.

Plots need matplotlib (``pip install matplotlib``); everything else here works without it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import (
    PLOTS_DIR,
    RESULTS_FILE,
    SCORES_FILE,
    layer_label,
    layer_table,
    read_results,
    results_table,
)

KEPT = "#2b6cb0"
REMOVED = "#e2e8f0"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: never open a window, works on headless machines
    import matplotlib.pyplot as plt

    return plt


def plot_kept_structure(layers: list, path: Path) -> Path:
    """Bars per layer of kept (blue) and removed (grey) heads and neurons, one panel per block kind."""
    plt = _pyplot()
    kinds = [(k, "heads") for k in dict.fromkeys(n for r in layers for n in r["dense_heads"])]
    kinds += [(k, "neurons") for k in dict.fromkeys(n for r in layers for n in r["dense_neurons"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.45 * len(layers) + 1.6), squeeze=False)
    names = [layer_label(r) for r in layers]
    for ax, (block, field) in zip(axes[0], kinds):
        dense = [r[f"dense_{field}"].get(block, 0) for r in layers]
        kept = [r[field].get(block, 0) for r in layers]
        y = range(len(layers))
        ax.barh(y, dense, color=REMOVED, label="removed")
        ax.barh(y, kept, color=KEPT, label="kept")
        for i, (k, n) in enumerate(zip(kept, dense)):
            dropped = layers[i]["dropped"]
            ax.text(n, i, f" {'dropped' if dropped else f'{k}/{n}'}", va="center", fontsize=8)
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        total_k, total_n = sum(kept), sum(dense) or 1
        ax.set_title(f"{block}: {total_k:,} of {total_n:,} kept ({total_k / total_n:.0%})", fontsize=10)
        ax.set_xlim(0, max(dense + [1]) * 1.3)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="upper right", fontsize=8, frameon=False, ncol=2)
    fig.suptitle("Kept structure per layer", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_importance(scores: dict, plan: dict, path: Path) -> Path | None:
    """Heatmaps of importance: heads (layers x heads, kept ones ringed) and FFN neurons (layers x neurons sorted
    by score, a tick at how many were kept), on a log scale relative to the block kind's largest score."""
    import numpy as np

    plt = _pyplot()
    by_block: dict = {}
    for key, value in scores.items():
        stack, index, block = key.rsplit(".", 2)
        by_block.setdefault(block, {})[(stack, int(index))] = np.asarray(value, dtype=np.float64).reshape(-1)
    if not by_block:
        return None
    by_block = dict(sorted(by_block.items(), key=lambda kv: kv[0] not in ("heads", "cross_heads")))  # heads first
    fig, axes = plt.subplots(1, len(by_block), figsize=(5.5 * len(by_block), 0.5 * max(len(v) for v in
                             by_block.values()) + 1.8), squeeze=False)
    for ax, (block, rows) in zip(axes[0], by_block.items()):
        keys = sorted(rows)
        width = max(len(rows[k]) for k in keys)
        # One scale per block kind across layers: the selection ranks them globally, so colours compare too.
        top = max(float(np.max(v)) if v.size else 0.0 for v in rows.values())
        grid = np.full((len(keys), width), np.nan)
        kept_marks = []
        for r, k in enumerate(keys):
            v = rows[k]
            scaled = relative_log(v, top)
            entries = plan.get(k[0]) or []
            entry = (entries[k[1]] if k[1] < len(entries) else None) or {}
            keep = None if entry.get("drop") else entry.get(block)
            if block in ("heads", "cross_heads"):
                grid[r, : len(v)] = scaled
                kept = range(len(v)) if keep is None and not entry.get("drop") else (keep or [])
                kept_marks += [(c, r) for c in kept]
            else:
                order = np.argsort(-scaled)
                grid[r, : len(v)] = scaled[order]
                n_kept = 0 if entry.get("drop") else len(v) if keep is None else len(keep)
                kept_marks.append((n_kept - 0.5, r))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=1.0)
        if block in ("heads", "cross_heads"):
            xs, ys = zip(*kept_marks) if kept_marks else ((), ())
            ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="white", linewidths=1.5)
            ax.set_xlabel("head (ringed: kept)")
            ax.set_xticks(range(width))
        else:
            for x, y in kept_marks:
                ax.plot([x, x], [y - 0.45, y + 0.45], color="white", linewidth=2)
            ax.set_xlabel("neuron, sorted by importance (white tick: number kept)")
        ax.set_yticks(range(len(keys)), [f"{s}[{i}]" if s != "layers" else f"layer {i}" for s, i in keys])
        ax.set_title(f"{block} importance", fontsize=10)
        bar = fig.colorbar(image, ax=ax, fraction=0.04)
        bar.set_ticks([i / DECADES for i in range(DECADES + 1)], labels=[f"1e-{DECADES - i}" if i < DECADES else "1"
                                                                      for i in range(DECADES + 1)])
        bar.set_label(f"score / largest {block} score (log)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


DECADES = 4


def relative_log(values, top: float, decades: int = DECADES):
    """Scores as ``log10(v / top)`` mapped from ``[-decades, 0]`` to ``[0, 1]`` (clipped). Importance scores are
    heavy-tailed, so a linear scale shows one bright cell and darkness elsewhere. Pure."""
    import numpy as np

    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if top <= 0:
        return np.zeros_like(v)
    with np.errstate(divide="ignore"):
        return np.clip(np.log10(v / top) / decades + 1.0, 0.0, 1.0)


def plot_pareto(sweep: dict, path: Path) -> Path:
    """Metric vs MACs and vs measured latency (both relative to dense) for each budget of a sweep; the Pareto
    front (no other point is both cheaper and better) is drawn as a line, labels give the budget."""
    plt = _pyplot()
    metric = next(iter(sweep["dense"]["metrics"]))
    lower_better = metric in ("mse", "mae", "mase", "perplexity", "loss")
    pts = sweep["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (name, xs) in zip(axes, (
        ("MACs / dense", [p["macs"] / sweep["dense"]["macs"] for p in pts]),
        ("measured latency / dense", [p["latency_ms"] / p["dense_latency_ms"] for p in pts]),
    )):
        ys = [p["metrics"][metric] for p in pts]
        ax.scatter(xs, ys, color=KEPT, zorder=3)
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(f"{p['ratio']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(list(zip(xs, ys)), lower_better)
        ax.plot(*zip(*front), color=KEPT, alpha=0.6)
        ax.scatter([1.0], [sweep["dense"]["metrics"][metric]], marker="*", s=160, color="#c53030", zorder=3,
                   label="dense")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    how = ", ".join(f"{k} {sweep[k]}" for k in ("criterion", "recovery") if sweep.get(k))
    fig.suptitle(f"{metric} vs cost: one-shot pruning at each {sweep['key']} (point labels)"
                 + (f"; {how}" if how else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: list, lower_better: bool = False) -> list:
    """Points no other point beats on both cost (x, lower is better) and metric (y), sorted by x. Pure."""
    sign = -1 if lower_better else 1
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


def read_scores(directory: Path) -> dict:
    path = Path(directory) / SCORES_FILE
    if not path.is_file():
        return {}
    from safetensors.numpy import load_file

    return load_file(str(path))


def draw_plots(directory: Path, results: dict, out: Path | None = None) -> list:
    """Draw the checkpoint's plots into ``out`` (default ``<directory>/plots``); returns the PNG paths."""
    from ..core.checkpoint.save import PLAN_FILE

    directory = Path(directory)
    out = Path(out) if out is not None else directory / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_kept_structure(results["layers"], out / "kept_structure.png")]
    plan_path = directory / PLAN_FILE
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    importance = plot_importance(read_scores(directory), plan, out / "importance.png")
    if importance is not None:
        paths.append(importance)
    return paths


def checkpoint_results(directory: Path) -> dict:
    """``hfprune_results.json`` of a checkpoint written by ``hfprune run``; for any other pruned checkpoint (from
    ``save_pretrained`` or a Trainer), costs measured from the model itself, loaded by hfprune (no code from the
    checkpoint runs), with the dense sizes its plan records."""
    directory = Path(directory)
    if (directory / RESULTS_FILE).is_file():
        return read_results(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a saved model")
    from ..core import cost
    from ..core.checkpoint.load import from_pretrained

    model = from_pretrained(directory)
    plan = getattr(model, "hfprune_plan", None)
    after = cost.estimate(model)
    layers = dense_rows(after, plan)
    results = {"model_type": model.config.model_type, "params": {"after": after.params},
               "macs": {"after": after.macs, "seq_len": after.seq_len}, "layers": layers,
               "metrics": {"before": {}, "after": {}}}
    version = _plan_version(directory)
    if version:
        results["hfprune_version"] = version
    if plan is not None and plan.base_model:
        results["base_model"] = plan.base_model
    return results


def dense_rows(after, plan) -> list:
    """Rows of :func:`layer_table` from a model's costs and the plan it was pruned with: every layer of the dense
    model, dropped ones included, with the dense sizes the plan records (the widest kept layer stands in for
    them when it records none: checkpoints from before plans carried ``dense``)."""
    from ..core.plan import ATTENTION_BLOCKS

    measured = {}
    for c in after.layers:
        measured.setdefault(c.stack, []).append(c)
    if plan is None or plan.dense is None:
        layers = [{"stack": c.stack, "index": c.index, "dropped": False, "heads": dict(c.heads),
                   "neurons": dict(c.neurons)} for c in after.layers]
        for r in layers:
            r["dense_heads"] = {k: max(x["heads"].get(k, 0) for x in layers) for k in r["heads"]}
            r["dense_neurons"] = {k: max(x["neurons"].get(k, 0) for x in layers) for k in r["neurons"]}
        return layers
    rows = []
    for key, entries in plan.stacks().items():
        kept = iter(measured.get(key, ()))
        for i, (entry, dense) in enumerate(zip(entries, plan.dense[key])):
            c = None if entry.drop else next(kept, None)
            heads = {n: d[0] for n, d in dense.items() if n in ATTENTION_BLOCKS}
            neurons = {n: d[0] for n, d in dense.items() if n not in ATTENTION_BLOCKS}
            rows.append({"stack": key, "index": i, "dropped": c is None, "dense_heads": heads,
                         "heads": dict(c.heads) if c else dict.fromkeys(heads, 0), "dense_neurons": neurons,
                         "neurons": dict(c.neurons) if c else dict.fromkeys(neurons, 0)})
    return rows


def _plan_version(directory: Path) -> str | None:
    from ..core.checkpoint.save import PLAN_FILE

    path = directory / PLAN_FILE
    try:
        return json.loads(path.read_text()).get("hfprune_version") if path.is_file() else None
    except ValueError:
        return None


def report(directory: str | Path, out: str | Path | None = None, plots: bool = True) -> tuple:
    """(markdown text, PNG paths) for a pruned checkpoint: what ``hfprune report DIR`` prints and draws."""
    directory = Path(directory)
    results = checkpoint_results(directory)
    parts = []
    if "before" in results["params"]:
        parts.append(results_table(results))
    else:
        parts.append(f"parameters: {results['params']['after']:,}; MACs (transformer layers, seq "
                     f"{results['macs']['seq_len']}): {results['macs']['after']:,}")
    parts.append(layer_table(results["layers"]))
    paths = draw_plots(directory, results, out) if plots else []
    return "\n\n".join(parts), paths

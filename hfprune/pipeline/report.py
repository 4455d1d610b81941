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
    """Bars per layer of kept (blue) units against the dense model's size (grey), one panel per block kind,
    each bar labelled ``kept/dense (share)``; dropped layers say so."""
    plt = _pyplot()
    kinds = [(k, "heads") for k in dict.fromkeys(n for r in layers for n in r["dense_heads"])]
    kinds += [(k, "neurons") for k in dict.fromkeys(n for r in layers for n in r["dense_neurons"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 0.45 * len(layers) + 2.0), squeeze=False)
    names = [layer_label(r) for r in layers]
    for ax, (block, field) in zip(axes[0], kinds):
        dense = [r[f"dense_{field}"].get(block, 0) for r in layers]
        kept = [r[field].get(block, 0) for r in layers]
        y = range(len(layers))
        ax.barh(y, dense, color=REMOVED, label="removed (full bar = dense size)")
        ax.barh(y, kept, color=KEPT, label="kept")
        for i, (k, n) in enumerate(zip(kept, dense)):
            text = "dropped" if layers[i]["dropped"] else f"{k}/{n} ({k / n:.0%})" if n else f"{k}"
            ax.text(n, i, f" {text}", va="center", fontsize=8, color="#c53030" if layers[i]["dropped"] else "black")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        total_k, total_n = sum(kept), sum(dense) or 1
        unit = "attention heads" if field == "heads" else "neurons"
        ax.set_title(f"{block}: {total_k:,} of {total_n:,} {unit} kept ({total_k / total_n:.0%})", fontsize=10)
        ax.set_xlabel(f"{unit} per layer")
        ax.set_xlim(0, max(dense + [1]) * 1.45)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="upper right", fontsize=8, frameon=False, ncol=2)
    fig.suptitle("Kept structure per layer vs the dense model", fontsize=12, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HEAD_BLOCKS = ("heads", "cross_heads")


def plot_importance(scores: dict, plan: dict, path: Path) -> Path | None:
    """Importance scores beside what was kept. Heads: a small layers x heads grid on one log scale relative to the
    largest head score, removed heads faded and crossed. Each FFN-like block: (1) layers x neurons sorted by
    score within the layer, each row normalised on its own log scale (so every layer's profile is readable, not
    only the strongest one's), removed neurons faded and a line at the number kept; (2) each layer's score spread
    on one common log axis, which shows why some layers lost more than others."""
    import numpy as np

    plt = _pyplot()
    by_block: dict = {}
    for key, value in scores.items():
        stack, index, block = key.rsplit(".", 2)
        by_block.setdefault(block, {})[(stack, int(index))] = np.asarray(value, dtype=np.float64).reshape(-1)
    if not by_block:
        return None
    by_block = dict(sorted(by_block.items(), key=lambda kv: kv[0] not in HEAD_BLOCKS))  # heads first
    panels = [(b, kind) for b in by_block for kind in (("heads",) if b in HEAD_BLOCKS else ("sorted", "spread"))]
    widths = {"heads": 1.0, "sorted": 1.5, "spread": 1.0}
    n_rows = max(len(v) for v in by_block.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(4.6 * widths[k] for _, k in panels) + 1.0,
                                                       0.45 * n_rows + 2.2),
                             squeeze=False, gridspec_kw={"width_ratios": [widths[k] for _, k in panels]})
    for ax, (block, kind) in zip(axes[0], panels):
        rows = by_block[block]
        keys = sorted(rows)
        values = [rows[k] for k in keys]
        kept = [kept_units(plan, k, block, len(rows[k])) for k in keys]
        labels = [f"{_stack_label(s, i)}  {len(m)}/{len(v)}" for (s, i), v, m in zip(keys, values, kept)]
        if kind == "heads":
            _heads_panel(fig, ax, block, values, kept, labels)
        elif kind == "sorted":
            _sorted_panel(fig, ax, block, values, kept, labels)
        else:
            _spread_panel(ax, block, values, kept, labels)
    fig.suptitle("Importance scores and what was kept (row labels: kept / dense units)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _stack_label(stack: str, index: int) -> str:
    return f"layer {index}" if stack == "layers" else f"{stack}[{index}]"


def kept_units(plan: dict, key: tuple, block: str, width: int) -> list:
    """Indices of the ``block`` units the plan keeps in layer ``key = (stack, index)``: all when the plan names
    none (``null`` or absent), none when the layer is dropped. Pure."""
    entries = plan.get(key[0]) or []
    entry = (entries[key[1]] if key[1] < len(entries) else None) or {}
    if entry.get("drop"):
        return []
    keep = entry.get(block)
    return list(range(width)) if keep is None else [int(i) for i in keep if 0 <= int(i) < width]


def _fade_removed(ax, mask):
    """White veil over removed cells of an ``imshow`` grid (``mask`` True = removed)."""
    import numpy as np

    veil = np.zeros(mask.shape + (4,))
    veil[..., :3] = 1.0
    veil[..., 3] = np.where(mask, 0.65, 0.0)
    ax.imshow(veil, aspect="auto", interpolation="nearest")


def _heads_panel(fig, ax, block, values, kept, labels):
    import numpy as np

    width = max(len(v) for v in values)
    top = max(float(np.max(v)) if v.size else 0.0 for v in values)
    decades = log_span(np.concatenate(values), top)
    grid = np.full((len(values), width), np.nan)
    removed = np.zeros(grid.shape, dtype=bool)
    for r, (v, keep) in enumerate(zip(values, kept)):
        grid[r, : len(v)] = relative_log(v, top, decades)
        removed[r, : len(v)] = True
        removed[r, keep] = False
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=1.0)
    _fade_removed(ax, removed)
    ys, xs = np.nonzero(removed)
    ax.scatter(xs, ys, marker="x", s=40, color="#c53030", linewidths=1.5, label="removed")
    ax.set_xticks(range(width))
    ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(values), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(len(values)), labels)
    ax.set_xlabel("head index (red x, faded: removed)")
    n_kept, n_all = sum(len(k) for k in kept), sum(len(v) for v in values)
    ax.set_title(f"{block}: {n_kept} of {n_all} kept\ncolour: score / largest head score (log)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05)
    bar.set_ticks([i / decades for i in range(decades + 1)],
                  labels=[f"1e-{decades - i}" if i < decades else "1" for i in range(decades + 1)])


def _sorted_panel(fig, ax, block, values, kept, labels):
    import numpy as np

    grid, removed, n_kept = sorted_grid(values, kept)
    cmap = _cmap("viridis").with_extremes(bad="#f7fafc")  # shorter rows (layers of differing width): blank
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest",
                      vmin=0.0, vmax=1.0)
    _fade_removed(ax, removed)
    for r, n in enumerate(n_kept):
        ax.plot([n - 0.5, n - 0.5], [r - 0.48, r + 0.48], color="#c53030", linewidth=2)
    ax.set_yticks(range(len(values)), labels)
    ax.set_xlabel("neuron rank within its layer (0 = most important); faded: removed")
    ax.set_title(f"{block}: {sum(n_kept):,} of {sum(len(v) for v in values):,} neurons kept, sorted by score"
                 "\ncolour: log score, rescaled per layer; red line: number kept", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.04)
    bar.set_ticks([0, 1], labels=["layer's low\n(1st pct)", "layer's\nmax"])
    bar.ax.tick_params(labelsize=7)


def _spread_panel(ax, block, values, kept, labels):
    import numpy as np

    for r, (v, keep) in enumerate(zip(values, kept)):
        is_kept = np.zeros(len(v), dtype=bool)
        is_kept[list(keep)] = True
        for part, dy, colour in ((v[is_kept], -0.18, KEPT), (v[~is_kept], 0.18, "#a0aec0")):
            pos = part[part > 0]
            if not pos.size:
                continue
            q = np.quantile(pos, [0.05, 0.25, 0.5, 0.75, 0.95])
            ax.plot([q[0], q[4]], [r + dy] * 2, color=colour, linewidth=1.2, solid_capstyle="butt")
            ax.plot([q[1], q[3]], [r + dy] * 2, color=colour, linewidth=6, solid_capstyle="butt")
            ax.plot([q[2]], [r + dy], "o", color="white", markeredgecolor="#1a202c", markersize=4)
        if (v > 0).any():
            ax.plot([v.max()], [r], "^", color="#2d3748", markersize=5)
    ax.plot([], [], color=KEPT, linewidth=6, label="kept")
    ax.plot([], [], color="#a0aec0", linewidth=6, label="removed")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_xscale("log")
    ax.set_ylim(len(values) - 0.5, -0.5)
    ax.set_yticks(range(len(values)), [label.split("  ")[0] for label in labels])
    ax.set_xlabel(f"{block} neuron score (log scale, one axis for all layers)")
    ax.set_title("score spread per layer, kept vs removed:\nbar 25-75%, line 5-95%, dot median, triangle max",
                 fontsize=10)
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def sorted_grid(values: list, kept: list, floor: float = 0.01):
    """(grid, removed, n_kept) for the sorted neuron heatmap. Row ``r``: layer ``r``'s scores sorted most
    important first, each rescaled on its own by :func:`row_normalise` (so each non-constant row spans
    ``[0, 1]``), padded with NaN to the widest layer; ``removed``: True where that sorted unit is not kept;
    ``n_kept``: kept units per layer. Pure."""
    import numpy as np

    width = max((len(v) for v in values), default=0)
    grid = np.full((len(values), width), np.nan)
    removed = np.zeros(grid.shape, dtype=bool)
    n_kept = []
    for r, (v, keep) in enumerate(zip(values, kept)):
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        order = np.argsort(-v, kind="stable")
        grid[r, : len(v)] = row_normalise(v, floor)[order]
        is_removed = np.ones(len(v), dtype=bool)
        is_removed[list(keep)] = False
        removed[r, : len(v)] = is_removed[order]
        n_kept.append(len(v) - int(is_removed.sum()))
    return grid, removed, n_kept


def row_normalise(values, floor: float = 0.01):
    """One layer's scores on a log scale rescaled to ``[0, 1]``: 1 at its largest score, 0 at (and below) its
    ``floor`` quantile of positive scores, so a few near-zero outliers do not squash the rest; zero and negative
    scores map to 0, a constant layer to all 1. Pure."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.zeros_like(v)
    pos = v > 0
    if not pos.any():
        return out
    logs = np.log10(v[pos])
    hi, lo = float(logs.max()), float(np.quantile(logs, floor))
    if hi - lo <= 0:
        out[pos] = 1.0
        return out
    out[pos] = np.clip((logs - lo) / (hi - lo), 0.0, 1.0)
    return out


DECADES = 4


def log_span(values, top: float, most: int = 6) -> int:
    """Whole decades between ``top`` and the smallest positive value (1 to ``most``): the log colour scale's
    range, so a block whose scores span two decades does not spend half the colours on nothing. Pure."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    v = v[v > 0]
    if top <= 0 or not v.size:
        return 1
    return int(min(most, max(1, np.ceil(np.log10(top / v.min()) - 1e-9))))


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
    """Metric vs MACs and vs measured latency (both as a fraction of the dense model's) for each budget of a
    sweep; the Pareto front (no other point is both cheaper and better) is drawn as a line, point labels give the
    budget, and the dense model is a red star with a dashed line at its metric."""
    plt = _pyplot()
    metric = next(iter(sweep["dense"]["metrics"]))
    lower_better = metric in ("mse", "mae", "mase", "perplexity", "loss")
    dense_value = sweep["dense"]["metrics"][metric]
    pts = sweep["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (name, xs) in zip(axes, (
        ("MACs as a fraction of dense (lower = cheaper)", [p["macs"] / sweep["dense"]["macs"] for p in pts]),
        ("measured latency as a fraction of dense (lower = faster)",
         [p["latency_ms"] / p["dense_latency_ms"] for p in pts]),
    )):
        ys = [p["metrics"][metric] for p in pts]
        ax.scatter(xs, ys, color=KEPT, zorder=3, label=f"pruned (label: {sweep['key']})")
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(f"{p['ratio']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(list(zip(xs, ys)), lower_better)
        if front:
            ax.plot(*zip(*front), color=KEPT, alpha=0.6, label="Pareto front")
        ax.axhline(dense_value, color="#c53030", linestyle="--", linewidth=1, alpha=0.6)
        ax.scatter([1.0], [dense_value], marker="*", s=180, color="#c53030", zorder=4,
                   label=f"dense ({metric} {dense_value:.4g})")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} ({'lower' if lower_better else 'higher'} is better)")
        ax.margins(x=0.08, y=0.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False, loc="upper right" if lower_better else "lower right")
        ax.spines[["top", "right"]].set_visible(False)
    how = ", ".join(f"{k} {sweep[k]}" for k in ("criterion", "recovery") if sweep.get(k))
    fig.suptitle(f"{metric} vs cost: one-shot pruning at each {sweep['key']}"
                 + (f" ({how})" if how else ""), fontsize=11)
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

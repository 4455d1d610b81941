# Copyright hfprune contributors. Apache-2.0.
"""The candidates' table (markdown, JSON) and plot (PNG: score against parameters and MACs, the chosen one marked)."""

from __future__ import annotations

import json
from pathlib import Path

TABLE_FILE, JSON_FILE, PLOT_FILE = "search_candidates.md", "search_candidates.json", "search_candidates.png"


def markdown_table(result) -> str:
    cfg = result.config
    recovered = any("recovered_score" in r for r in result.rows)
    distilled = any("distilled_score" in r for r in result.rows)
    head = ["", "shape", "parameters", "MACs", "memory (MB)", f"{cfg.budget} of dense", cfg.metric]
    if recovered:
        head.append(f"{cfg.metric} after {cfg.recovery}")
    if distilled:
        head.append(f"{cfg.metric} distilled")
    lines = [f"Budget: {cfg.budget} <= {cfg.ratio:.3g} of dense; held-out dense {cfg.metric} "
             f"{result.dense[cfg.metric]:.4g}; {len(result.rows)} candidates ({result.evaluated} scored now, "
             f"{result.eval_cached} from the cache); scoring passes run: {result.passes_run or 'none'}, cached: "
             f"{result.passes_cached or 'none'}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in result.rows:
        cells = ["**chosen**" if r.get("chosen") else "", r["label"], f"{r['params']:,}", f"{r['macs']:,}",
                 f"{r['memory'] / 1e6:,.1f}", f"{r['fraction']:.3f}", f"{r['score']:.4g}"]
        if recovered:
            cells.append(f"{r['recovered_score']:.4g}" if "recovered_score" in r else "")
        if distilled:
            cells.append(f"{r['distilled_score']:.4g}" if "distilled_score" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result.config.metric
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "macs", "MACs (G)")):
        scale = 1e6 if key == "params" else 1e9
        xs = [r[key] / scale for r in result.rows]
        ax.scatter(xs, [r["score"] for r in result.rows], s=18, alpha=0.7, label="candidates")
        best = result.best
        final = best.get("distilled_score", best.get("recovered_score", best["score"]))
        after = ("distilled" if "distilled_score" in best else
                 result.config.recovery if "recovered_score" in best else "")
        ax.scatter([best[key] / scale], [final], marker="*", s=220, c="red",
                   label="chosen" + (f" (after {after})" if after else ""))
        ax.axhline(result.dense[metric], ls="--", c="gray", lw=1, label="dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {metric}")
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"shape search: {result.config.budget} <= {result.config.ratio:.3g} of dense")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_report(result, folder: str | Path, plots: bool = True) -> list:
    """Write the table, the JSON and (``plots``) the PNG into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / TABLE_FILE, folder / JSON_FILE]
    paths[0].write_text(markdown_table(result) + "\n")
    paths[1].write_text(json.dumps(result.to_dict(), indent=1, default=float))
    if plots:
        paths.append(plot(result, folder / PLOT_FILE))
    return paths

# Copyright hfprune contributors. Apache-2.0.
"""Model cards for pruned checkpoints, built with huggingface_hub's ``ModelCard`` / ``ModelCardData``.

Metadata: ``base_model``, ``library_name``, tags (``hfprune``, ``pruned``, ``distilled`` when a teacher was
used), and a ``model-index`` with each metric before and after pruning. Body: the before/after table (metrics,
parameters, MACs, measured latency and speedup with the hardware named), the kept heads/neurons per layer, the
plots, how to load it, and the recipe that made it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import RECIPE_FILE, layer_table, metric_title, results_table
from .tasks import TASKS

DATASET_NAMES = {"movie_reviews": "Movie-review sentences (Pang & Lee 2005, polar subset)"}


def card_data(results: dict):
    """``ModelCardData`` for a run's results (see ``hfprune_results.json``)."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["hfprune", "pruned", "structured-pruning"]
    if results.get("distilled"):
        tags.append("distilled")
    task_cls = TASKS.get(results.get("task"))
    # a task this hfprune does not know (results written by another version): its own name stands as the type
    task = task_cls.card_task_type if task_cls else results.get("task") or "other"
    dataset = results.get("dataset") or "unknown"
    split = results.get("eval", {}).get("split")
    evals = []
    for stage, label in (("before", "dense, before pruning"), ("after", "pruned")):
        for name, value in results["metrics"].get(stage, {}).items():
            evals.append(EvalResult(task_type=task, dataset_type=dataset,
                                    dataset_name=DATASET_NAMES.get(dataset, dataset), dataset_split=split,
                                    metric_type=name, metric_value=round(float(value), 6),
                                    metric_name=f"{metric_title(name, results.get('eval', {}))} ({label})"))
    name = results.get("recipe") or "pruned-model"
    return ModelCardData(
        base_model=base_model_id(results),
        library_name="transformers",
        pipeline_tag=task_cls.pipeline_tag if task_cls else None,
        tags=tags,
        model_name=name,
        eval_results=evals or None,
        datasets=None,
    )


def base_model_id(results: dict) -> str | None:
    """The Hub id the card's ``base_model`` names, or ``None``: the Hub links the card to that repo, so a local
    path or an internal alias (``asset:minilm``) must never stand there."""
    from ..core.plan import hub_id

    return hub_id(results.get("base_model_id")) or hub_id(results.get("base_model"))


def _summary(results: dict) -> str:
    p, m = results["params"], results["macs"]
    parts = [f"{p['after'] / p['before']:.0%} of the parameters" if "before" in p else None,
             f"{m['after'] / m['before']:.0%} of the transformer layers' MACs" if "before" in m else None]
    lat = results.get("latency")
    if lat:
        parts.append(f"{lat['speedup']:.2f}x faster on {lat['hardware']} (measured)")
    return ", ".join(x for x in parts if x)


def card_text(results: dict, recipe_yaml: str | None, plots: list, remote_code: bool = True,
              labels: dict | None = None) -> str:
    """The card's markdown body; ``remote_code``: the checkpoint carries ``modeling_hfprune.py`` (per-layer
    widths), else it is a plain checkpoint that stock transformers loads; ``labels``: the config's ``id2label``,
    listed under the results when it names real labels (not the default ``LABEL_0``, ``LABEL_1``, ...)."""
    name = results.get("recipe") or "pruned model"
    task_cls = TASKS.get(results.get("task"))
    auto = task_cls.auto_class if task_cls and task_cls.auto_class else "AutoModel"
    pr = results.get("pruning", {})
    budget = ", ".join(f"{k}={v}" for k, v in pr.items() if k.endswith("_ratio") and v is not None)
    how = [f"- method: {results.get('method', 'unknown')}"
           + (f", criterion `{pr['criterion']}`" if pr.get("criterion") else "")
           + (f", budget {budget}" if budget else "")
           + (f", recovery `{results['recovery']}`" if results.get("recovery") else ""),
           f"- distilled from the dense model: {'yes' if results.get('distilled') else 'no'}",
           f"- base model: `{base_model_id(results) or results.get('model_path') or results.get('base_model')}`",
           f"- hfprune {results.get('hfprune_version', '?')}"]
    lines = [
        f"# {name}",
        "",
        "Structurally pruned with hfprune: attention heads and FFN neurons are physically removed, so the "
        "weight matrices are smaller. " + (_summary(results) + "." if _summary(results)
                                                                            else ""),
        "",
        "## Results",
        "",
        results_table(results) if "before" in results["params"] else "",
        "",
        *([labels_line(labels), ""] if labels_line(labels) else []),
        "## How to load",
        "",
        *(_load_remote(auto) if remote_code else _load_plain(auto)),
        "",
        "## Kept structure per layer",
        "",
        layer_table(results["layers"]),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots] + [""]
    lines += ["## How it was made", ""] + how + [""]
    if recipe_yaml:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


MAX_LABELS = 40


def labels_line(id2label: dict | None) -> str | None:
    """A markdown line naming the output labels (``id2label``, keys as ints or as the strings config.json holds),
    or ``None`` when there are none or all are transformers' defaults ``LABEL_<i>``. Pure."""
    if not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if all(name == f"LABEL_{i}" for i, name in items):
        return None
    shown = ", ".join(f"{i} = `{name}`" for i, name in items[:MAX_LABELS])
    more = f", and {len(items) - MAX_LABELS} more (see `id2label` in config.json)" if len(items) > MAX_LABELS else ""
    return f"Labels ({len(items)}, from `id2label` in config.json): {shown}{more}."


def _load_remote(auto: str) -> list:
    return [
        "The per-layer widths differ, so the checkpoint carries its own modeling code (`modeling_hfprune.py`, "
        "plain torch and transformers); hfprune itself is not needed:",
        "",
        "```python",
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("REPO_ID", trust_remote_code=True)',
        "```",
        "",
        "With hfprune installed, `hfprune.from_pretrained` rebuilds the same model from the config and the plan "
        "without running any code from the repository:",
        "",
        "```python",
        "import hfprune",
        "",
        'model = hfprune.from_pretrained("REPO_ID")',
        "```",
    ]


def _load_plain(auto: str) -> list:
    return [
        "Every layer has the same widths, which the config states: stock transformers loads it, with no remote "
        "code:",
        "",
        "```python",
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("REPO_ID")',
        "```",
        "",
        "`hfprune.from_pretrained(\"REPO_ID\")` loads it too, with its prune plan, ready to prune further.",
    ]


def build_card(directory: str | Path, repo_id: str | None = None):
    """The ``ModelCard`` of a checkpoint directory written by ``hfprune run`` (or any pruned checkpoint: then
    the card holds what can be measured from the files)."""
    from huggingface_hub import ModelCard

    from .report import checkpoint_results

    directory = Path(directory)
    results = checkpoint_results(directory)
    recipe_path = directory / RECIPE_FILE
    recipe_yaml = recipe_path.read_text() if recipe_path.is_file() else None
    plots = results.get("plots") or sorted(str(p.relative_to(directory)) for p in (directory / "plots").glob("*.png"))
    data = card_data(results)
    text = card_text(results, recipe_yaml, plots, remote_code=_has_remote_code(directory),
                     labels=_id2label(directory))
    if repo_id:
        text = text.replace('"REPO_ID"', json.dumps(repo_id))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _id2label(directory: Path) -> dict | None:
    """The checkpoint config's ``id2label`` (``None`` when it has none or config.json cannot be read)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    labels = config.get("id2label")
    return labels if isinstance(labels, dict) else None


def _has_remote_code(directory: Path) -> bool:
    """Whether the checkpoint is a heterogeneous one (config.json carries hfprune's record)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return bool(config.get("hfprune"))

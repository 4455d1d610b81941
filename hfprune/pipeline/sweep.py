# Copyright hfprune contributors. Apache-2.0.
"""``hfprune sweep RECIPE``: one-shot pruning of the recipe's dense model at several budgets, each evaluated and
timed against the dense model, with a table and an accuracy-vs-cost Pareto plot.

Example:

```python
>>> from hfprune.pipeline.recipe import load_recipe
>>> from hfprune.pipeline.sweep import sweep
>>> result = sweep(load_recipe("recipes/minilm/movie-sentiment/oneshot.yaml"), [0.4, 0.6, 0.8])  # doctest: +SKIP
```
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics

from ..pruning.latency import time_models

# Through the module, not `from .run import load_model, ...`: the loading steps have one place to be replaced
# (tests forbid loading there, to prove every argument is checked before a model is loaded).
from . import run
from .artifacts import PARETO_PLOT, SWEEP_FILE, SWEEP_SUFFIX, SWEEP_TABLE_FILE, SweepResults, sweep_table
from .evaluation import evaluate_model, hardware, latency_input
from .recipe import Recipe

logger = logging.getLogger("hfprune")

BUDGET_KEYS = ("macs_ratio", "params_ratio", "latency_ratio")


def check_sweep(recipe: Recipe, ratios: list, key: str) -> list:
    """Everything about the arguments, checked before the dense model is loaded and evaluated (minutes); returns
    ``[(ratio, PruningConfig)]`` by ratio."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a hfprune.pipeline.recipe.Recipe (load_recipe(...)), got "
                        f"{type(recipe).__name__}")
    if not isinstance(key, str) or key not in BUDGET_KEYS:
        raise ValueError(f"sweep key {key!r}; choose one of {BUDGET_KEYS}")
    if recipe.method != "oneshot":
        raise ValueError("sweep runs one-shot pruning; use a recipe with method: oneshot")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)) or not ratios:
        raise ValueError(f"ratios={ratios!r}: give a non-empty list of budgets in (0, 1], e.g. [0.4, 0.6, 0.8]")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"sweep ratio {ratio!r} ({key}): each ratio must be a number in (0, 1]")
    budgets = {k: None for k in BUDGET_KEYS + ("head_ratio", "ffn_ratio", "expert_ratio")}
    # PruningConfig checks each budget with the recipe's other settings (scope, recovery) now, not mid-sweep
    return [(float(r), dataclasses.replace(recipe.pruning, **{**budgets, key: float(r)})) for r in sorted(ratios)]


def sweep(recipe: Recipe, ratios: list, key: str = "macs_ratio") -> SweepResults:
    """One-shot pruning of the recipe's dense model at each budget in ``ratios`` (``pruning.<key>``), each
    evaluated and timed against the dense model; writes ``sweep.json``, ``sweep.md`` and ``pareto.png`` into
    ``<output dir>-sweep``. Returns ``{"dense": {...}, "points": [...]}``."""
    from ..core import cost
    from ..pruning.oneshot import prune

    configs = check_sweep(recipe, ratios, key)
    path = run.resolve_model_path(recipe)
    tokenizer = run.load_tokenizer(recipe, path)
    dense = run.load_model(recipe, path)
    data = run.load_data(recipe, tokenizer, model=dense)
    if data is None:
        raise ValueError("sweep needs data to evaluate each budget (data.loader is none)")
    d, e = recipe.data, recipe.evaluation
    collate = run.collator(recipe, tokenizer, dense)
    calibration = run.batches(run.subset(data[d.train_split], d.calibration_samples, recipe.seed), collate,
                              d.calibration_batch_size)
    eval_batches = run.batches(run.subset(data[d.eval_split], d.max_eval_samples, recipe.seed), collate,
                               e.batch_size)
    batch = latency_input(recipe, dense, eval_batches)
    dense_cost = cost.estimate(dense, seq_len=recipe.pruning.seq_len)
    out = {"dense": {"metrics": evaluate_model(recipe, dense, eval_batches), "macs": dense_cost.macs,
                     "params": dense_cost.params}, "points": [], "key": key, "hardware": hardware(),
           "criterion": recipe.pruning.criterion,
           "recovery": recipe.pruning.resolved_recovery + ("+bias" if recipe.pruning.bias_compensation else "")}
    scores = None
    if recipe.pruning.resolved_recovery == "none" and not recipe.pruning.bias_compensation \
            and key != "latency_ratio":
        # Without recovery the plan is a pure function of the scores and the budget: score the dense model once.
        scorer = recipe.pruning.build_importance()
        scores = scorer.score(dense.eval(), calibration if scorer.needs_data else None)
    for ratio, config in configs:
        model = copy.deepcopy(dense)
        if scores is not None:
            from ..core.apply import apply_plan
            from ..pruning.oneshot import plan_from_scores

            apply_plan(model, plan_from_scores(model, scores, config))
        else:
            prune(model, calibration, config)
        after = cost.estimate(model, seq_len=config.seq_len)
        times = time_models({"dense": dense, "pruned": model}, batch, e.latency_rounds)
        point = {"ratio": float(ratio), "metrics": evaluate_model(recipe, model, eval_batches),
                 "macs": after.macs, "params": after.params,
                 "latency_ms": statistics.median(times["pruned"]),
                 "dense_latency_ms": statistics.median(times["dense"])}
        logger.info("%s=%.2f: %s", key, ratio, point["metrics"])
        out["points"].append(point)
        del model
    target = recipe.output_dir.with_name(recipe.output_dir.name + SWEEP_SUFFIX)  # beside the checkpoint, not in it
    target.mkdir(parents=True, exist_ok=True)
    (target / SWEEP_FILE).write_text(json.dumps(out, indent=1) + "\n")
    (target / SWEEP_TABLE_FILE).write_text(sweep_table(out) + "\n")
    from .report import plot_pareto

    out["plot"] = str(plot_pareto(out, target / PARETO_PLOT))
    return out

# Copyright hfprune contributors. Apache-2.0.
"""``search(model, calibration, SearchConfig(...))``: score every axis once, enumerate the shapes that meet the
budget, score each on held-out blocks, optionally recover the finalists, and prune ``model`` to the best."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.calibration import calibration_batches, check_batches
from ...core.plan import PrunePlan
from . import per_layer
from .cache import SearchCache, data_fingerprint, digest, model_fingerprint
from .config import SearchConfig
from .enumerate import Meter, enumerate_candidates, fraction_label, geometry
from .evaluate import adopt, evaluate, evaluate_plan, materialize
from .scores import axis_scores

logger = logging.getLogger("hfprune")


@dataclass
class SearchResult:
    """The candidates (one row each, best first), the chosen one's plan and what the search cost.

    ``passes_run`` / ``passes_cached``: the scoring passes run now and those loaded from the cache;
    ``evaluated`` / ``eval_cached``: candidate evaluations run now and loaded."""

    config: SearchConfig
    rows: list
    chosen: int
    plan: PrunePlan
    dense: dict
    passes_run: list
    passes_cached: list
    evaluated: int
    eval_cached: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> dict:
        return self.rows[self.chosen]

    def to_dict(self, plans: bool = True) -> dict:
        """JSON-ready; ``plans=False`` leaves out each candidate's plan (kept indices of every layer, ~170 kB each
        for a 30-layer model) and keeps the chosen one's."""
        rows = self.rows if plans else [{k: v for k, v in r.items() if k != "plan"} for r in self.rows]
        return {"config": self.config.to_dict(), "dense": self.dense, "chosen": self.chosen,
                "plan": self.plan.to_dict(), "candidates": rows, "passes_run": self.passes_run,
                "passes_cached": self.passes_cached, "evaluated": self.evaluated, "eval_cached": self.eval_cached,
                "seconds": self.seconds, **self.extra}

    def table(self) -> str:
        from .report import markdown_table

        return markdown_table(self)


def split_examples(batches: list, n: int) -> tuple:
    """``(calibration, held out)``: the last ``n`` examples of ``batches`` (dicts of tensors) are held out."""
    rows = [{k: v[i : i + 1] for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches
            for i in range(len(next(t for t in b.values() if isinstance(t, torch.Tensor))))]
    if len(rows) <= n:
        raise ValueError(f"the calibration data has {len(rows)} examples; the search holds out eval_examples={n} "
                         "to score candidates and needs at least one more to score the axes (or pass eval data)")

    def rebatch(part: list) -> list:
        size = len(next(t for t in batches[0].values() if isinstance(t, torch.Tensor)))
        return [{k: torch.cat([r[k] for r in part[j : j + size]]) for k in part[0]} for j in range(0, len(part), size)]

    return rebatch(rows[:-n]), rebatch(rows[-n:])


def shape_kind(shape: dict, dense: dict) -> tuple:
    """The axes a candidate shrinks (fields of :class:`~.enumerate.Shape` below the dense model's), and
    ``per_layer`` for a per-layer candidate."""
    kind = tuple(k for k, v in shape.items() if k in dense and v is not None and dense[k] is not None and v < dense[k])
    return kind + (("per_layer",) if any(k.endswith("_layers") for k in shape) else ())


def finalist_rows(rows: list, dense: dict, best: int, per_kind: bool) -> list:
    """Indices (into ``rows``, best score first) of the candidates to recover: the ``best`` first ones, and with
    ``per_kind`` the first of every kind of shape (see :func:`shape_kind`) not already among them."""
    chosen = list(range(min(best, len(rows))))
    if per_kind:
        seen = {shape_kind(rows[i]["shape"], dense) for i in chosen}
        for i, row in enumerate(rows):
            kind = shape_kind(row["shape"], dense)
            if kind not in seen:
                seen.add(kind)
                chosen.append(i)
    return chosen


def search(model: nn.Module, calibration, config: SearchConfig, eval_data=None, latency_table=None,
           apply: bool = True) -> SearchResult:
    """Search shapes under ``config``'s budget and prune ``model`` in place to the best (``apply=False``: leave
    it). ``calibration``: model-ready batches (a list of dicts); ``eval_data``: held-out batches the candidates are
    scored on (default: the last ``config.eval_examples`` examples of ``calibration``, then not used for scoring).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune.pruning.search import SearchConfig, search
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, num_key_value_heads=2))
    >>> data = [{"input_ids": torch.randint(0, 64, (4, 16))} for _ in range(2)]
    >>> result = search(model, data, SearchConfig(ratio=0.8, eval_examples=2, grid={"depth": [1, 0.75]}))
    >>> result.best["fraction"] <= 0.8
    True
    ```
    """
    start = time.perf_counter()
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a hfprune.pruning.search.SearchConfig, got {type(config).__name__}")
    target = unwrap(model)
    calibration = check_batches(target, calibration)
    if calibration is None:
        raise ValueError("the shape search needs calibration data: it scores every axis and every candidate on it")
    calibration = [dict(b) for b in calibration_batches(calibration)]
    if eval_data is None:
        calibration, held_out = split_examples(calibration, config.eval_examples)
    else:
        held_out = [dict(b) for b in calibration_batches(check_batches(target, eval_data, what="evaluation"))]
    geo = geometry(target, config)  # refuses a model the search cannot describe, before any pass
    if config.per_layer and not per_layer.layer_axes(config, geo):
        raise ValueError(f"per_layer=True varies the FFN width or key/value groups per layer; axes={config.axes} "
                         f"with this {geo.model_type} model (it has {list(geo.present)}) searches neither")
    if config.budget == "latency" and latency_table is None:
        from ..latency import measure

        latency_table = measure(target, 8, config.seq_len)
    meter = Meter(target, config, geo, latency_table)
    fp = model_fingerprint(target)
    scores_key = digest(fp, data_fingerprint(calibration), config.criterion, config.hidden_criterion,
                        config.expert_criterion, config.seed)
    cache = SearchCache(config.cache_dir, scores_key, digest(fp, data_fingerprint(held_out), config.metric))
    axes = tuple(a for a in config.axes if a in geo.present)
    was_training = target.training
    target.eval()
    try:
        timings = {"setup": time.perf_counter() - start}
        scores, ran = axis_scores(target, calibration, config, axes, cache)
        timings["scoring"] = time.perf_counter() - start - sum(timings.values())
        candidates = enumerate_candidates(target, scores, config, geo, meter)
        dense = cache.get_eval("dense")
        if dense is None:
            dense = evaluate(target, held_out)
            cache.put_eval("dense", dense)
        per_layer_evals = 0
        if config.per_layer:
            sens = per_layer.sensitivities(target, geo, scores, config, held_out, cache, dense["nll"])
            candidates += per_layer.per_layer_candidates(geo, scores, config, meter, sens, per_layer.bases(geo, config))
            timings["per_layer"] = time.perf_counter() - start - sum(timings.values())
            per_layer_evals = len(sens)
        rows, evaluated, hits = [], 0, 0
        for n, cand in enumerate(candidates):
            result, cached, _ = evaluate_plan(target, cand.plan, held_out, cache)
            evaluated, hits = evaluated + (not cached), hits + cached
            logger.info("candidate %d/%d %s: %s %.4f", n + 1, len(candidates), fraction_label(cand.shape, geo),
                        config.metric, result[config.metric])
            rows.append({"shape": cand.shape.to_dict(), "label": fraction_label(cand.shape, geo), **cand.costs,
                         "fraction": cand.fraction, "score": result[config.metric], "nll": result["nll"],
                         "cached": cached, "plan": cand.plan})
        order = sorted(range(len(rows)), key=lambda i: rows[i]["score"])
        rows = [rows[i] for i in order]
        chosen, built = 0, {}
        timings["candidates"] = time.perf_counter() - start - sum(timings.values())
        if config.recovery != "none":
            finalists = finalist_rows(rows, geo.dense_shape().to_dict(), config.finalists, config.finalist_per_kind)
            for i in finalists:
                result, cached, built[i] = evaluate_plan(target, rows[i]["plan"], held_out, cache, config.recovery,
                                                         calibration, config.recovery_examples, keep=apply)
                rows[i]["recovered_score"] = result[config.metric]
                evaluated, hits = evaluated + (not cached), hits + cached
            chosen = min(finalists, key=lambda i: rows[i]["recovered_score"])
            timings["recovery"] = time.perf_counter() - start - sum(timings.values())
        plan = rows[chosen]["plan"]
        for row in rows:
            row["plan"] = row["plan"].to_dict()
        if apply and built.get(chosen) is not None:
            adopt(model, built[chosen])
        elif apply:
            materialize(model, plan, config.recovery, calibration, config.recovery_examples, inplace=True)
        built.clear()
        timings["apply"] = time.perf_counter() - start - sum(timings.values())
    finally:
        target.train(was_training)
    for i, row in enumerate(rows):
        row["chosen"] = i == chosen
    cached_passes = [p for p in dict.fromkeys(scores) if p not in ran]
    extra = {"timings": timings, "per_layer_evaluations": per_layer_evals, "budget_dense": meter.dense,
             "budget_limit": config.ratio * meter.dense, "geometry": {
        "layers": geo.layers, "hidden": geo.hidden, "heads": geo.heads, "kv_groups": geo.groups, "ffn": geo.ffn,
        "experts": geo.experts}}
    return SearchResult(config, rows, chosen, plan, dense, ran, cached_passes, evaluated, hits,
                        time.perf_counter() - start, extra)


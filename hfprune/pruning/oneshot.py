# Copyright hfprune contributors. Apache-2.0.
"""Retraining-free pruning: score -> select -> slice. ``hfprune.prune(model, data, PruningConfig(...))``."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..core import cost
from ..core.apply import apply_plan, as_model, model_dims, unwrap
from ..core.blocks import iter_blocks
from ..core.calibration import calibration_batches, check_batches
from ..core.plan import PlanError, PrunePlan
from . import budget as select
from . import obs, recovery
from .config import PruningConfig, require_config
from .importance import importance_class, supported_importance
from .latency import LatencyTable


@dataclass
class PruneResult:
    """What :func:`prune` did: the plan, the pruned model, costs before and after, and the time taken."""

    plan: PrunePlan
    model: nn.Module
    before: cost.CostReport
    after: cost.CostReport
    seconds: float
    scores: dict
    recovery: str = "none"
    scales: dict | None = None  # block key -> fitted output scales of its kept units (mask tuning)
    latency: LatencyTable | None = None

    def table(self) -> str:
        b, a = self.before, self.after
        rows = [
            f"{'':<10}{'before':>16}{'after':>16}{'ratio':>8}",
            f"{'params':<10}{b.params:>16,}{a.params:>16,}{a.params / b.params:>8.3f}",
            f"{'MACs':<10}{b.macs:>16,}{a.macs:>16,}{a.macs / b.macs:>8.3f}",
            f"(MACs of the transformer layers at seq_len {b.seq_len}; pruned in {self.seconds:.1f} s; "
            f"recovery: {self.recovery})",
            "",
            a.table(),
        ]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def blocks_for(model: nn.Module, scores: dict, config: PruningConfig, latency: LatencyTable | None = None) -> list:
    """Selection blocks with per-unit costs in the budget's currency: parameters or MACs from
    :func:`hfprune.core.cost.unit_costs` (weights only), or seconds (the slope of each block's fitted latency line, per
    head or neuron, with the block's overhead shared out)."""
    model = unwrap(model)
    by_params = config.params_ratio is not None
    out = []
    for block in iter_blocks(model):
        if block.units == 0 or block.key not in scores:  # emptied, or a block the criterion does not score (kept)
            continue
        if block.kind == "expert_ffn" and config.budget_kind != "ratio":
            continue  # every expert keeps as many neurons as the others: only ffn_ratio (per layer) prunes them
        unit = cost.unit_costs(block, config.seq_len)
        per_unit, per_kv = (unit.params, unit.kv_params) if by_params else (unit.macs, unit.kv_macs)
        if latency is not None:  # measured per kept head or neuron, key/value cost and overhead shared out
            if block.key not in latency.entries:
                continue  # not timed (routed experts): kept
            entry = latency.entries[block.key]
            per_unit, per_kv = entry.slope + entry.intercept / unit.units, 0.0
        group = block.units // block.dims()[1] if block.kind == "expert_ffn" else unit.group  # neurons per expert
        least = block.top_k() if block.kind == "experts" else 0  # a router needs its top-k experts
        out.append(select.Block(block.key, scores[block.key], float(per_unit), group, float(per_kv), least))
    return out


def plan_from_scores(model: nn.Module, scores: dict, config: PruningConfig,
                     latency: LatencyTable | None = None) -> PrunePlan:
    """Turn importance scores into a plan under ``config``'s budget and constraints (no data needed)."""
    model = unwrap(model)
    kept, _ = select_kept(model, scores, config, latency)
    return select.to_plan(kept, model_dims(model), model.config.model_type)


def select_kept(model: nn.Module, scores: dict, config: PruningConfig, latency: LatencyTable | None = None) -> tuple:
    """``({block key: kept indices}, selection blocks)`` under ``config``'s budget; a latency budget needs
    ``latency`` (a table measured for this model)."""
    model = unwrap(model)
    kind = config.budget_kind
    if kind == "latency" and latency is None:
        raise ValueError("a latency_ratio budget needs a latency table (hfprune.pruning.latency.measure(model))")
    blocks = blocks_for(model, scores, config, latency if kind == "latency" else None)
    if config.resolved_normalize == "layer":
        blocks = select.normalize(blocks)
    choose = select.select_uniform if config.scope == "uniform" else select.select_global
    given = ", ".join(f"{n}={getattr(config, n)!r}" for n in _budget_names(config))
    try:
        if kind == "ratio":
            kept = select.select_per_layer(blocks, config.head_ratio, config.ffn_ratio, config.min_heads,
                                           config.round_to, expert_ratio=config.expert_ratio)
        elif kind == "latency":
            kept = _select_latency(blocks, choose, config, latency)
        else:
            dense = cost.estimate(model, seq_len=config.seq_len)
            total = dense.params if kind == "params" else dense.macs
            budget = getattr(config, f"{kind}_ratio") * total
            fixed = total - sum(b.unit_cost * len(b.scores) + b.kv_unit_cost * len(b.scores) // b.group
                                for b in blocks)
            kept = choose(blocks, budget, fixed_cost=fixed, min_heads=config.min_heads, round_to=config.round_to)
    except PlanError as err:  # selection speaks in MACs or parameters; say which setting that came from
        raise PlanError(f"{given}: {err}") from None
    emptied = all(b.key in kept and not len(kept[b.key]) for b in blocks)
    if blocks and emptied and not getattr(config, "allow_empty", False):
        # A budget under the cost of one head or neuron per model is a typo far more often than a wish for a
        # bias-only model; refuse it here, where the model's costs are known, rather than in the config.
        raise PlanError(f"the budget {given} keeps no head and no neuron in any layer of this "
                        f"{model.config.model_type} model ({len(blocks)} blocks); give a larger budget or "
                        "min_heads >= 1, or pass allow_empty=True to accept a model whose layers are bias-only")
    return kept, blocks


def check_budget(model: nn.Module, config: PruningConfig, latency: LatencyTable | None = None) -> None:
    """Raise the :class:`PlanError` selection would (a budget the constraints cannot meet, or one that keeps
    nothing) before any scoring pass or training step. Both depend on the model's costs and the constraints, not
    on which units score higher, so a selection on equal scores tells."""
    model = unwrap(model)
    equal = {(key, i, name): torch.ones(size[0]) for key, layers in model_dims(model).items()
             for i, blocks in enumerate(layers) for name, size in blocks.items()}
    select_kept(model, equal, config, latency)


def _budget_names(config: PruningConfig) -> list:
    """The budget fields ``config`` sets (one of macs/params/latency, or head and/or FFN ratios)."""
    return [n for n in ("macs_ratio", "params_ratio", "latency_ratio", "head_ratio", "ffn_ratio", "expert_ratio")
            if getattr(config, n) is not None]


def _select_latency(blocks: list, choose, config: PruningConfig, latency: LatencyTable) -> dict:
    """Selection under a latency budget. Unit costs share each block's fixed overhead out over its units, which
    underestimates a partly kept block; so the budget handed to selection is bisected down until the table's
    prediction for the chosen plan (overhead counted for every block that keeps anything) fits."""
    target = config.latency_ratio * latency.dense()

    def attempt(budget):
        try:
            kept = choose(blocks, budget, min_heads=config.min_heads, round_to=config.round_to)
        except PlanError:
            return None
        return kept if latency.predict({k: len(v) for k, v in kept.items()}) <= target else None

    best = attempt(target)
    lo, hi = 0.0, target
    for _ in range(30 if best is None else 0):
        mid = (lo + hi) / 2
        kept = attempt(mid)
        if kept is None:
            hi = mid
        else:
            best, lo = kept, mid
    if best is None:
        raise PlanError(f"the latency budget {target:.4g} s ({config.latency_ratio:.0%} of the dense layers' "
                        f"predicted {latency.dense():.4g} s) cannot be met with min_heads={config.min_heads}")
    return best


def prune(model: nn.Module, calibration: Iterable | None, config: PruningConfig, *, tokenizer=None,
          latency_table: LatencyTable | None = None) -> PruneResult:
    """Score, select, recover and physically prune ``model`` in place; returns a :class:`PruneResult`.

    ``calibration`` is a DataLoader, a list of model-ready batches, or a tokenised ``datasets.Dataset``
    (batched by ``config.calibration_batch_size``, padded with ``DataCollatorWithPadding(tokenizer)`` when a
    tokenizer is given). Criteria that need no data (magnitude, random) accept ``None`` (then no recovery runs).
    A ``latency_ratio`` budget uses ``latency_table``, or measures one on the model's device
    (:func:`hfprune.pruning.latency.measure` at ``config.latency_batch_size`` x ``config.seq_len``).

    Example:

    ```python
    >>> import torch, hfprune
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...                                                  num_attention_heads=4, intermediate_size=64))
    >>> result = hfprune.prune(model, None, hfprune.PruningConfig(criterion="magnitude", macs_ratio=0.5))
    >>> result.after.macs <= 0.5 * result.before.macs
    True
    ```
    """
    start = time.perf_counter()
    # every check before the model is touched: a bad argument leaves the model as it was
    config = require_config(config)
    target = as_model(model)
    if latency_table is not None and not isinstance(latency_table, LatencyTable):
        raise TypeError(f"latency_table must be a hfprune.pruning.latency.LatencyTable or None, got "
                        f"{type(latency_table).__name__}")
    calibration = check_batches(target, calibration, tokenizer)
    mode = config.resolved_recovery
    criterion = config.build_importance()
    if calibration is None and (criterion.needs_data or config.recovery not in ("auto", "none")
                                or config.bias_compensation):
        data_free = " or ".join(repr(n) for n in supported_importance() if not importance_class(n).needs_data)
        raise ValueError(f"criterion {config.criterion!r} with recovery {config.recovery!r} and bias_compensation="
                         f"{config.bias_compensation} needs calibration data; pass batches or use {data_free} with "
                         "recovery='none' and bias_compensation=False")
    if calibration is None:
        mode = "none"
    else:
        calibration = calibration_batches(calibration, config.calibration_batch_size, tokenizer)
        if iter(calibration) is calibration:  # a one-shot iterator: scoring and recovery both read it
            calibration = list(calibration)
    if config.scope == "search":  # uniform shapes searched across axes: hfprune.pruning.search
        from .search import SearchConfig, search

        before = cost.estimate(target, seq_len=config.seq_len)
        found = search(model, calibration, SearchConfig.from_pruning(config), latency_table=latency_table)
        return PruneResult(found.plan, model, before, cost.estimate(target, seq_len=config.seq_len), found.seconds,
                           {}, found.config.recovery, latency=latency_table)
    if config.target == "hidden":
        from .hidden import prune_hidden

        plan, scores, before, after, seconds = prune_hidden(model, calibration, config)
        return PruneResult(plan, model, before, after, seconds, scores, "none")
    if config.bias_compensation:
        recovery.bias_flags_needed(target)  # fail before the (possibly long) scoring pass
    if config.budget_kind == "latency" and latency_table is None:
        from .latency import measure

        latency_table = measure(target, config.latency_batch_size, config.seq_len)
    check_budget(target, config, latency_table)  # seconds before a scoring pass that may take minutes
    was_training = target.training
    target.eval()
    before = cost.estimate(target, seq_len=config.seq_len)
    try:
        scores = criterion.score(target, calibration)
        kept, blocks = select_kept(target, scores, config, latency_table)
        if mode in ("rearrange", "full"):
            kept = recovery.rearrange_kept(kept, criterion.blocks, {b.key: b.group for b in blocks})
        scales = None
        if mode in ("lstsq", "full"):
            scales = recovery.tune_scales(target, kept, calibration, max_examples=config.recovery_examples)
        if mode == "obs":
            kept = obs.reconstruct(target, kept, calibration, max_examples=config.recovery_examples)
        if config.bias_compensation:
            recovery.compensate_biases(target, kept, calibration, max_examples=config.recovery_examples)
            mode = "bias" if mode == "none" else f"{mode}+bias"
        plan = select.to_plan(kept, model_dims(target), target.config.model_type)
        apply_plan(model, plan)
    finally:
        target.train(was_training)
    after = cost.estimate(target, seq_len=config.seq_len)
    return PruneResult(plan, model, before, after, time.perf_counter() - start, scores, mode, scales,
                       latency_table)

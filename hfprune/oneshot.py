# Copyright hfprune contributors. Apache-2.0.
"""Retraining-free pruning: score -> select -> slice. ``hfprune.prune(model, data, PruningConfig(...))``."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from . import cost, select
from .apply import apply_plan, model_dims, unwrap
from .arch import get_adapter
from .config import PruningConfig
from .importance import get_importance
from .plan import PrunePlan
from .structure import attention_dims, get_module, in_features, out_features


@dataclass
class PruneResult:
    """What :func:`prune` did: the plan, the pruned model, costs before and after, and the time taken."""

    plan: PrunePlan
    model: nn.Module
    before: cost.CostReport
    after: cost.CostReport
    seconds: float
    scores: dict

    def table(self) -> str:
        b, a = self.before, self.after
        rows = [
            f"{'':<10}{'before':>16}{'after':>16}{'ratio':>8}",
            f"{'params':<10}{b.params:>16,}{a.params:>16,}{a.params / b.params:>8.3f}",
            f"{'MACs':<10}{b.macs:>16,}{a.macs:>16,}{a.macs / b.macs:>8.3f}",
            f"(MACs of the transformer layers at seq_len {b.seq_len}; pruned in {self.seconds:.1f} s)",
            "",
            a.table(),
        ]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def blocks_for(model: nn.Module, scores: dict, config: PruningConfig) -> list:
    """Selection blocks with per-unit costs in the budget's currency (MACs, or parameters)."""
    model = unwrap(model)
    spec = get_adapter(model).arch_spec(model.config)
    by_params = config.params_ratio is not None
    t = config.seq_len
    out = []
    for key, stack in spec.stacks.items():
        for i, layer in enumerate(get_module(model.base_model, stack.layers)):
            for name, attn in stack.attention.items():
                heads, kv_heads, hd = attention_dims(layer, attn)
                if heads == 0:
                    continue
                hidden = in_features(get_module(layer, attn.q))
                o_out = out_features(get_module(layer, attn.o))
                per_token = hidden * hd + hd * o_out
                kv = 2 * hidden * hd
                if attn.fused_qkv:  # every head carries its own k and v
                    per_token, kv = per_token + kv, 0
                unit = per_token if by_params else t * per_token + 2 * hd * t * t
                out.append(select.Block((key, i, name), scores[(key, i, name)], float(unit), heads // kv_heads,
                                        float(kv if by_params else t * kv)))
            for name, ffn in stack.ffn.items():
                down = get_module(layer, ffn.down)
                per_token = sum(in_features(get_module(layer, p)) for p in ffn.up) + out_features(down)
                if in_features(down) == 0:
                    continue
                out.append(select.Block((key, i, name), scores[(key, i, name)],
                                        float(per_token if by_params else t * per_token)))
    return out


def plan_from_scores(model: nn.Module, scores: dict, config: PruningConfig) -> PrunePlan:
    """Turn importance scores into a plan under ``config``'s budget and constraints (no data needed)."""
    model = unwrap(model)
    blocks = blocks_for(model, scores, config)
    normalize = config.normalize
    if normalize == "auto":
        normalize = "layer" if config.criterion in ("magnitude", "activation") else "none"
    if normalize == "layer":
        blocks = select.normalize(blocks)
    if config.scope == "per_layer":
        kept = select.select_per_layer(blocks, config.head_ratio, config.ffn_ratio, config.min_heads, config.round_to)
    else:
        dense = cost.estimate(model, seq_len=config.seq_len)
        if config.params_ratio is not None:
            total, budget = dense.params, config.params_ratio * dense.params
        else:
            total, budget = dense.macs, config.macs_ratio * dense.macs
        prunable = sum(b.unit_cost * len(b.scores) + b.kv_unit_cost * len(b.scores) // b.group for b in blocks)
        kept = select.select_global(blocks, budget, fixed_cost=total - prunable, min_heads=config.min_heads,
                                    round_to=config.round_to)
    return select.to_plan(kept, model_dims(model), model.config.model_type)


def prune(model: nn.Module, calibration: Iterable | None, config: PruningConfig) -> PruneResult:
    """Score, select and physically prune ``model`` in place; returns a :class:`PruneResult`.

    ``calibration`` is an iterable of model-ready batches (a DataLoader or a list of dicts); criteria that
    need no data (magnitude, random) accept ``None``.

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
    target = unwrap(model)
    criterion = get_importance(config.criterion, **({"seed": config.seed} if config.criterion == "random" else {}))
    if criterion.needs_data and calibration is None:
        raise ValueError(f"criterion {config.criterion!r} needs calibration data; pass batches or use 'magnitude'")
    was_training = target.training
    target.eval()
    scores = criterion.score(target, calibration)
    plan = plan_from_scores(target, scores, config)
    before = cost.estimate(target, seq_len=config.seq_len)
    apply_plan(model, plan)
    target.train(was_training)
    after = cost.estimate(target, seq_len=config.seq_len)
    return PruneResult(plan, model, before, after, time.perf_counter() - start, scores)

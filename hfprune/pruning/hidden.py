# Copyright hfprune contributors. Apache-2.0.
"""Hidden-size pruning in one shot: score channels, size the kept count to the budget, slice.

``hfprune.prune(model, data, PruningConfig(target="hidden", criterion="activation", params_ratio=0.8))`` lands
here. Parameters and MACs are linear in the hidden size (every parameter along it shrinks in proportion), so the
kept count for a parameter or MAC budget is solved from two cost estimates, then rounded down (``round_to``, and
``num_attention_heads`` where the stock config states the hidden size: the Llama family's configs require it to
divide the hidden size, so the result stays a plain checkpoint).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..core import cost
from ..core.apply import apply_plan, model_dims, unwrap
from ..core.arch import get_adapter
from ..core.hidden import hidden_size, supports_hidden
from ..core.plan import PlanError, PrunePlan
from .config import PruningConfig
from .importance.hidden import hidden_scores


def hidden_step(model: nn.Module, round_to: int = 1) -> int:
    """The multiple the kept hidden size is rounded to: ``round_to``, times what the stock config needs."""
    model = unwrap(model)
    step = round_to
    if get_adapter(model).hidden_fields is not None:
        step = math.lcm(step, int(getattr(model.config, "num_attention_heads", 1) or 1))
    return step


def hidden_count(model: nn.Module, config: PruningConfig) -> int:
    """How many hidden channels ``config``'s budget keeps (rounded down to :func:`hidden_step`)."""
    model = unwrap(model)
    size = hidden_size(model)
    step = hidden_step(model, config.round_to)
    if config.hidden_ratio is not None:
        k = config.hidden_ratio * size
    else:
        kind = "params" if config.params_ratio is not None else "macs"
        layers = [{} for _ in range(len(model_dims(model)["layers"]))]

        def at(k: int) -> int:
            est = cost.estimate(model, {"hidden": list(range(k)), "layers": layers}, seq_len=config.seq_len)
            return getattr(est, kind)

        full, one = at(size), at(1)
        slope = (full - one) / (size - 1) if size > 1 else full
        dense = getattr(cost.estimate(model, seq_len=config.seq_len), kind)
        budget = getattr(config, f"{kind}_ratio") * dense
        k = (budget - (full - slope * size)) / slope if slope > 0 else size
    kept = int(math.floor(k / step + 1e-9)) * step
    if kept < 1:
        raise PlanError(f"the budget keeps {k:.1f} of {size} hidden channels, under one multiple of {step} "
                        f"(round_to={config.round_to}" + (", num_attention_heads" if step != config.round_to else "")
                        + "); give a larger budget")
    return min(kept, size)


def prune_hidden(model: nn.Module, calibration, config: PruningConfig) -> tuple:
    """Score hidden channels, keep the best :func:`hidden_count` of them, slice. ``(plan, scores, cost before,
    cost after, seconds)``; ``scores["hidden"]`` holds the channels' scores."""
    start = time.perf_counter()
    target = unwrap(model)
    if not supports_hidden(target):
        raise PlanError(f"target='hidden': hfprune cannot prune the hidden size of {type(target).__name__} "
                        f"(model_type {target.config.model_type!r})")
    keep_n = hidden_count(target, config)  # a budget that cannot be met fails before scoring
    was_training = target.training
    target.eval()
    before = cost.estimate(target, seq_len=config.seq_len)
    try:
        scores = hidden_scores(target, calibration, config.criterion, seed=config.seed)
        keep = sorted(torch.topk(scores.float(), keep_n).indices.tolist())
        layers = {key: [{} for _ in rows] for key, rows in model_dims(target).items()}
        plan = PrunePlan.from_dict({"hidden": keep, **layers, "model_type": target.config.model_type})
        apply_plan(model, plan)
    finally:
        target.train(was_training)
    after = cost.estimate(target, seq_len=config.seq_len)
    return plan, {"hidden": scores}, before, after, time.perf_counter() - start

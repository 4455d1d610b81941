# Copyright hfprune contributors. Apache-2.0.
"""Scoring candidates: slice a copy of the dense model to the candidate's plan and measure the held-out loss.

``materialize`` is also how the chosen candidate is built: with ``recovery="obs"`` the layers are dropped first,
then structured OBS (:mod:`hfprune.pruning.recovery.obs`) reconstructs the kept layers' output projections on the
calibration data as the depth-pruned model computes them (re-picking FFN neurons), then heads, FFN neurons, experts
and hidden channels are sliced.
"""

from __future__ import annotations

import copy

from torch import nn

from ...core.apply import apply_plan, unwrap
from ...core.plan import PrunePlan
from ...perplexity import perplexity
from .cache import SearchCache, digest


def materialize(model: nn.Module, plan: PrunePlan, recovery: str = "none", calibration: list | None = None,
                max_examples: int | None = None, inplace: bool = False) -> nn.Module:
    """``model`` pruned to ``plan`` with the given recovery: a copy (``model`` left as it is) unless ``inplace``."""
    pruned = model if inplace else copy.deepcopy(unwrap(model))
    if recovery == "none" or calibration is None:
        return apply_plan(pruned, plan)
    from ..recovery.obs import reconstruct

    layers = plan.to_dict()["layers"]
    kept_layers = [i for i, entry in enumerate(layers) if not entry.get("drop")]
    if len(kept_layers) < len(layers):
        apply_plan(pruned, {"layers": [{"drop": True} if entry.get("drop") else {} for entry in layers]})
    rest = [layers[i] for i in kept_layers]  # renumbered: indices of the depth-pruned model
    kept = {("layers", j, name): tuple(entry[name]) for j, entry in enumerate(rest)
            for name in ("heads", "ffn") if entry.get(name) is not None}
    if kept:
        kept = reconstruct(pruned, kept, calibration, max_examples=max_examples)
        for (_, j, name), keep in kept.items():
            rest[j][name] = sorted(int(k) for k in keep)
    second = {"layers": rest, **({"hidden": list(plan.hidden)} if plan.hidden is not None else {})}
    return apply_plan(pruned, second)


def plan_key(plan: PrunePlan, recovery: str = "none") -> str:
    return digest(plan.to_dict(), recovery)


def evaluate(model: nn.Module, batches: list) -> dict:
    """Held-out perplexity, mean NLL and token count of ``model`` on ``batches``."""
    result = perplexity(model, batches)
    return {"perplexity": result["perplexity"], "nll": result["nll"], "tokens": result["tokens"]}


def evaluate_plan(model: nn.Module, plan: PrunePlan, batches: list, cache: SearchCache, recovery: str = "none",
                  calibration: list | None = None, max_examples: int | None = None, keep: bool = False) -> tuple:
    """``(evaluation, cached, pruned model or None)``: the cached evaluation of ``plan`` if there is one, else slice,
    score and cache; ``keep``: return the pruned copy too (a recovered finalist, not rebuilt if it wins)."""
    key = plan_key(plan, recovery)
    hit = cache.get_eval(key)
    if hit is not None:
        return hit, True, None
    pruned = materialize(model, plan, recovery, calibration, max_examples)
    result = evaluate(pruned, batches)
    cache.put_eval(key, result)
    return result, False, pruned if keep else None


def adopt(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """Prune ``model`` in place to what ``pruned`` (a pruned copy of it) is, weights included: its recorded plan
    (dense indices) is applied, then its weights are loaded (same shapes)."""
    apply_plan(model, pruned.hfprune_plan)
    unwrap(model).load_state_dict(unwrap(pruned).state_dict())
    return model

# Copyright hfprune contributors. Apache-2.0.
"""``hfprune.sparsify``: zero single weights of a model's attention and FFN projections in one shot."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.apply import as_model
from ...core.calibration import calibration_batches, check_batches, device_batches
from .config import SparsityConfig
from .criteria import (
    column_norms,
    layerwise,
    magnitude_scores,
    movement_scores,
    outlier_ratio,
    owl_sparsities,
    random_scores,
    wanda_scores,
)
from .patterns import check_shape, mask_for
from .sparsegpt import sparsegpt_prune
from .targets import SparsityPlan, apply_masks, find_targets, layer_groups, plan_from_weights

PLAN_ATTRIBUTE = "hfprune_sparsity"  # the model's SparsityPlan after sparsify (read by save_sparse)


@dataclass
class SparsityResult:
    """What :func:`sparsify` did: the :class:`SparsityPlan` (sparsity reached per weight), the keep masks, the
    target sparsity per layer (``ratios="owl"`` varies it) and the time taken."""

    plan: SparsityPlan
    model: nn.Module
    seconds: float
    masks: dict = field(repr=False, default_factory=dict)
    layer_sparsity: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        return self.plan.to_markdown()

    table = to_markdown

    def __str__(self) -> str:
        return self.to_markdown()


def sparsify(model: nn.Module, calibration: Iterable | None = None, config: SparsityConfig | None = None, *,
             tokenizer=None) -> SparsityResult:
    """Zero single weights of ``model``'s block projections in place (weights stay in their dense shape).

    ``calibration``: model-ready batches (a list, DataLoader or tokenised ``datasets.Dataset``), needed by
    ``wanda``, ``sparsegpt``, ``movement`` (with labels) and ``ratios="owl"``. Every check runs before the model
    changes, and a failure half-way restores the weights.

    Example:

    ```python
    >>> import torch, hfprune
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune.pruning.sparsity import SparsityConfig
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> result = hfprune.sparsify(model, None, SparsityConfig(criterion="magnitude", pattern="2:4"))
    >>> round(result.plan.sparsity, 3)
    0.5
    ```
    """
    start = time.perf_counter()
    config = SparsityConfig() if config is None else config
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a hfprune SparsityConfig, got {type(config).__name__}")
    target = as_model(model)
    pattern, sparsity = config.parsed_pattern, config.resolved_sparsity
    targets = checked_targets(target, config, calibration)
    batches = None
    if calibration is not None:
        calibration = check_batches(target, calibration, tokenizer)
        batches = calibration_batches(calibration, config.calibration_batch_size, tokenizer)
        batches = device_batches(target, batches, config.max_examples)
    groups = layer_groups(targets)
    saved = {t.name: t.weight().detach().to("cpu", copy=True) for t in targets}
    was_training = target.training
    target.eval()
    masks: dict = {}
    try:
        layer_sparsity = _layer_sparsity(target, batches, targets, groups, config, sparsity)
        _run(target, batches, targets, groups, config, layer_sparsity, masks)
    except BaseException:
        with torch.no_grad():
            for t in targets:
                t.weight().copy_(saved[t.name].to(t.weight().device))
        raise
    finally:
        target.train(was_training)
    plan = plan_from_weights(targets, str(pattern), config.to_dict())
    setattr(target, PLAN_ATTRIBUTE, plan)
    return SparsityResult(plan, model, time.perf_counter() - start, masks,
                          {_layer_name(k): v for k, v in layer_sparsity.items()})


def checked_targets(model: nn.Module, config: SparsityConfig, calibration) -> list:
    """The weights ``config`` sparsifies in ``model``, after the checks that need no data: there are some, the
    pattern fits each, calibration is there when the criterion or ratios need it, and a layer-wise criterion does
    not target the head. Shared by :func:`sparsify` and the layer-by-layer path from disk (a meta model)."""
    targets = find_targets(model, config.targets)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no attention or FFN projection to sparsify")
    for t in targets:
        check_shape(t.shape, config.parsed_pattern, t.name)
    if config.needs_data and calibration is None:
        why = f"criterion {config.criterion!r}" if config.ratios != "owl" else "ratios='owl'"
        raise ValueError(f"{why} needs calibration batches; pass them, or use criterion 'magnitude' or 'random' "
                         "with ratios='uniform'")
    if config.criterion in ("wanda", "sparsegpt") and any(t.layer is None for t in targets):
        raise ValueError(f"criterion {config.criterion!r} runs layer by layer over the blocks; the head is outside "
                         "them: use targets='blocks'")
    return targets


def _layer_name(key) -> str:
    return "head" if key is None else f"{key[0]}.{key[1]}"


def _layer_sparsity(model, batches, targets, groups, config: SparsityConfig, sparsity: float) -> dict:
    """``{(stack, index) or None: sparsity}``: uniform, or OWL from the dense model's Wanda scores."""
    if config.ratios == "uniform":
        return {key: sparsity for key in groups}
    norms = column_norms(model, batches, targets)
    layers = [key for key in groups if key is not None]
    ratios = [outlier_ratio([wanda_scores(t.weight(), norms[t.name]) for t in groups[key]], config.owl_threshold)
              for key in layers]
    out = dict(zip(layers, owl_sparsities(ratios, sparsity, config.owl_lambda)))
    if None in groups:
        out[None] = sparsity
    return out


def layer_pruner(config: SparsityConfig, layer_sparsity: dict, masks: dict) -> tuple:
    """``(statistics kind, prune_layer(targets, stats))`` of a layer-wise criterion (``wanda``: ``"norms"``,
    ``sparsegpt``: ``"hessian"``): ``prune_layer`` masks (and for SparseGPT updates) one layer's targets in place
    and records their masks in ``masks``. Shared by :func:`sparsify` and the layer-by-layer path from disk
    (:mod:`.sequential`), so both prune a layer the same way."""
    pattern = config.parsed_pattern
    if config.criterion == "sparsegpt":
        def prune_layer(layer_targets, stats):
            for n, t in enumerate(layer_targets):
                w = t.weight()
                # projections reading one input (q/k/v, gate/up) share one Hessian: the last of them prunes in its
                # storage, so it is never copied more than once and is released before the next input's turn
                hessian = stats.pop(t.name)
                last = all(stats.get(o.name) is not hessian for o in layer_targets[n + 1:])
                new, keep = sparsegpt_prune(w.detach(), hessian, pattern, layer_sparsity[t.layer],
                                            config.block_size, config.damp, overwrite=last)
                del hessian
                w.copy_(new.to(w.dtype))
                masks[t.name] = keep.cpu()

        return "hessian", prune_layer
    if config.criterion == "wanda":
        def prune_layer(layer_targets, stats):
            for t in layer_targets:
                scores = wanda_scores(t.weight(), stats[t.name])
                masks[t.name] = mask_for(scores, pattern, layer_sparsity[t.layer], per_row=True).cpu()
            apply_masks(layer_targets, masks)

        return "norms", prune_layer
    raise ValueError(f"criterion {config.criterion!r} is not layer-wise; 'wanda' and 'sparsegpt' are")


def _run(model, batches, targets, groups, config: SparsityConfig, layer_sparsity: dict, masks: dict) -> None:
    pattern = config.parsed_pattern
    if config.criterion in ("sparsegpt", "wanda"):
        kind, prune_layer = layer_pruner(config, layer_sparsity, masks)
        layerwise(model, batches, groups, kind, prune_layer)
        return
    if config.criterion == "movement":
        scores = movement_scores(model, batches, targets)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        scores = {t.name: magnitude_scores(t.weight()) if config.criterion == "magnitude"
                  else random_scores(t.weight(), generator) for t in targets}
    for t in targets:
        masks[t.name] = mask_for(scores[t.name], pattern, layer_sparsity[t.layer]).cpu()
    apply_masks(targets, masks)

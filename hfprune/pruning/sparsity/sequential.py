# Copyright hfprune contributors. Apache-2.0.
"""Weight-level sparsity of a checkpoint on disk, one layer at a time: :func:`sparsify_sequential`.

The model is built on the meta device (:class:`~hfprune.pruning.lazy.LazyModel`), as for structured sequential
pruning (:mod:`hfprune.pruning.sequential`). For ``wanda`` and ``sparsegpt`` the embeddings are loaded only to
record the first layer's call on every calibration batch, then go back to the meta device. Each layer is then loaded
from the checkpoint, its targets' input statistics (Wanda's column norms, SparseGPT's Hessians) are summed on the
outputs of the layers before it *after* they were sparsified, by the same hooks as ``hfprune.sparsify``
(:func:`~hfprune.pruning.sparsity.criteria.stats_hooks`); it is pruned by the same function
(:func:`~hfprune.pruning.sparsity.oneshot.layer_pruner`), run again to give the next layer's inputs, and written as
one safetensors shard into the save's staging folder. ``magnitude`` and ``random`` read each layer once and run
no forward pass. ``ratios="owl"`` adds one dense pass over the layers first (Wanda scores of the unchanged model,
as in memory). The tensors outside the layers are copied one at a time at the end (the head masked when
``targets="blocks+head"``), and the save commits atomically with ``sparsity_plan.json``.

``criterion="movement"`` needs the gradient of the whole model's loss and is refused here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ...core.calibration import calibration_batches, check_batches, first_examples, iterate
from ...core.checkpoint.save import stage_checkpoint
from ...core.checkpoint.sparse import SPARSITY_FILE, compress_tensors
from ...core.checkpoint.transaction import Transaction, check_target
from ...core.layerwise import run_layer
from ..lazy import LazyModel, return_freed_memory
from ..seqio import HiddenStore, ShardWriter, check_writable, layer_pass
from ..sequential import check_family, record_first_calls
from .config import SparsityConfig
from .criteria import magnitude_scores, outlier_ratio, owl_sparsities, random_scores, stats_hooks, wanda_scores
from .oneshot import PLAN_ATTRIBUTE, SparsityResult, checked_targets, layer_pruner
from .patterns import mask_for
from .targets import SparsityPlan, Target, apply_masks, layer_groups, plan_from_weights

LAYERWISE = ("magnitude", "random", "wanda", "sparsegpt")  # what this path runs
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def sparsity_problem(config: SparsityConfig) -> str | None:
    """Why ``config`` cannot run layer by layer from disk (naming what can), or ``None`` when it can."""
    if config.criterion not in LAYERWISE:
        return (f"criterion {config.criterion!r} needs the gradient of the whole model's loss, which a "
                f"layer-by-layer pass cannot give; layer by layer runs {', '.join(LAYERWISE)} (ratios uniform or "
                "owl), or the in-memory path (hfprune.sparsify, hfprune sparsify --no-sequential) runs it")
    return None


def sparsify_sequential(model_dir, calibration, config: SparsityConfig, output_dir, *, dtype=None, offload_dir=None,
                        stage=None, device=None, compact: bool = False, keep_masks: bool = False,
                        tokenizer=None) -> SparsityResult:
    """Sparsify the checkpoint in ``model_dir`` layer by layer into ``output_dir``: the same masks and weights as
    ``hfprune.sparsify`` on the loaded model with the same ``calibration`` and ``config``, without the model ever
    in memory (peak: one layer, the calibration hidden states and, for SparseGPT, that layer's input Hessians).

    ``calibration``: model-ready batches (or a tokenised ``datasets.Dataset``); ``None`` for magnitude / random
    with uniform ratios. ``dtype``: what the weights are loaded and pruned in (default: the checkpoint's);
    ``device``: where each layer runs (default: the GPU when there is one). ``offload_dir``: keep the calibration
    hidden states there between layers. ``compact``: store each sparse weight as bit mask plus kept values (load
    with ``hfprune.from_pretrained``); otherwise an ordinary checkpoint with zeros in place. ``keep_masks``: return
    every keep mask in ``result.masks`` (one byte per weight, so off by default); ``tokenizer``: tokenises a text
    ``datasets.Dataset`` as ``hfprune.sparsify`` does. ``stage(folder, result)`` may write
    more files into the save before it commits. Every check runs before anything is written. Returns a
    :class:`~hfprune.pruning.sparsity.oneshot.SparsityResult` whose ``model`` is on the meta device.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune.pruning.sparsity import SparsityConfig
    >>> from hfprune.pruning.sparsity.sequential import sparsify_sequential
    >>> dense, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                              num_attention_heads=4, num_key_value_heads=2)).save_pretrained(dense)
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    >>> result = sparsify_sequential(dense, batches, SparsityConfig(criterion="sparsegpt", pattern="2:4"), out)
    >>> round(result.plan.sparsity, 3)
    0.5
    ```
    """
    start = time.perf_counter()
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a hfprune SparsityConfig, got {type(config).__name__}")
    problem = sparsity_problem(config)
    if problem:
        raise ValueError(problem)
    _check_output(output_dir, model_dir)
    if offload_dir is not None:
        check_writable(offload_dir)
    lazy = LazyModel(model_dir, dtype=dtype, device=device)
    model = lazy.model
    stack_key, _, layers = check_family(model)
    targets = checked_targets(model, config, calibration)
    batches = []
    if calibration is not None:
        calibration = check_batches(model, calibration, tokenizer)
        batches = first_examples(list(calibration_batches(calibration, config.calibration_batch_size, tokenizer)),
                                 config.max_examples)
        if not batches:
            raise ValueError("the calibration data is empty")
    rest = lazy.rest_keys(layers)  # a head the checkpoint lacks: refused before any pass
    groups = layer_groups(targets)
    with layer_pass(model, offload_dir) as (store, use_cache):
        calls = []
        if config.needs_data:  # the embeddings serve only the first layer's inputs, then go back to meta
            lazy.load_rest(layers)
            calls = record_first_calls(model, layers, batches, store, "h")
            lazy.unload_rest()
        layer_sparsity = _layer_sparsity(lazy, stack_key, layers, groups, batches, calls, store, config)
        result = _write(lazy, stack_key, layers, rest, groups, batches, calls, store, config, layer_sparsity,
                        output_dir, compact, keep_masks, stage, use_cache, start)
    result.seconds = time.perf_counter() - start
    setattr(model, PLAN_ATTRIBUTE, result.plan)
    return result


def _check_output(output_dir, model_dir) -> Path:
    """``output_dir`` is not a file, could be written (its nearest existing folder is writable) and is not the
    dense checkpoint's own folder; nothing is created."""
    path = check_target(output_dir)
    if path.is_dir() and Path(model_dir).is_dir() and os.path.samefile(path, model_dir):
        raise ValueError(f"output_dir {str(output_dir)!r} is the model folder: the dense checkpoint would be "
                         "replaced; give another folder")
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot save into {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save into {path}: {probe} is not writable by this process; give a folder "
                              "it can write")
    return path


def _local(targets: list, module) -> list:
    """``targets`` (found on the meta model) pointing at the same projections of ``module``, a loaded layer (or
    the model itself for the head)."""
    return [Target(t.name, module.get_submodule(t.path), t.layer, t.path) if t.layer is not None else t
            for t in targets]


def _collect(layer, layer_targets: list, kind: str, batches: list, calls: list, store: HiddenStore, tag: str,
             advance: bool) -> dict:
    """``kind`` statistics of ``layer_targets``' inputs over every batch's hidden states ``store[tag j]``, in batch
    order as the in-memory pass sums them; with ``advance`` (and no targets to prune in between) the layer's outputs
    replace its inputs in ``store``."""
    stats: dict = {}
    current: dict = {}
    handles = stats_hooks({t.name: t.module for t in layer_targets}, kind, current, stats)
    try:
        for j, batch in enumerate(batches):
            current.update(batch=batch, last=None)
            out = run_layer(layer, store.get(f"{tag}{j}"), calls[j])
            if advance:
                store.put(f"{tag}{j}", out)
    finally:
        for h in handles:
            h.remove()
    return stats


def _layer_sparsity(lazy, stack_key, layers, groups: dict, batches, calls, store, config: SparsityConfig) -> dict:
    """``{(stack, index) or None: sparsity}``: uniform, or OWL from a dense pass's Wanda scores (each layer read
    once more, its outputs feeding the next dense layer)."""
    sparsity = config.resolved_sparsity
    if config.ratios == "uniform":
        return dict.fromkeys(groups, sparsity)
    for j in range(len(batches)):  # the dense stream starts where the pruned one does
        store.put(f"o{j}", store.get(f"h{j}"))
    ratios = {}
    for i in iterate(range(len(layers)), "owl statistics"):
        layer = lazy.load_layer(layers, i)
        mine = _local(groups.get((stack_key, i), []), layer)
        norms = _collect(layer, mine, "norms", batches, calls, store, "o", i + 1 < len(layers))
        if mine:
            ratios[mine[0].layer] = outlier_ratio([wanda_scores(t.weight(), norms[t.name]) for t in mine],
                                                  config.owl_threshold)
        del layer, mine
        return_freed_memory()
    keys = [key for key in groups if key is not None]
    out = dict(zip(keys, owl_sparsities([ratios[k] for k in keys], sparsity, config.owl_lambda)))
    if None in groups:
        out[None] = sparsity
    return out


def _write(lazy, stack_key, layers, rest, groups, batches, calls, store, config, layer_sparsity, output_dir, compact,
           keep_masks, stage, use_cache, start) -> SparsityResult:
    """Prune and write each layer, then the tensors outside the layers, config and plan; commit. Returns the
    result (built before the commit, so ``stage`` can write it into the save)."""
    model = lazy.model
    pattern = config.parsed_pattern
    masks: dict = {}
    plan = SparsityPlan(config=config.to_dict())
    generator = torch.Generator().manual_seed(config.seed)  # random: one stream over the targets in order
    kind, prune_layer = layer_pruner(config, layer_sparsity, masks) if config.criterion in ("wanda", "sparsegpt") \
        else (None, None)
    kept_masks: dict = {}

    def finish(mine: list) -> dict:
        """Record ``mine``'s plan rows (and masks when asked) once their weights are final."""
        part = plan_from_weights(mine, str(pattern))
        plan.weights.update(part.weights)
        plan.layers.update(part.layers)
        if keep_masks:
            kept_masks.update({t.name: masks[t.name] for t in mine})
        masks.clear()
        return {t.name for t in mine}

    txn = Transaction(output_dir, weights=WEIGHTS)
    with txn as staging:
        writer = ShardWriter(staging, total=len(layers) + len(rest))
        for i in iterate(range(len(layers)), "sparsify layer by layer"):
            layer = lazy.load_layer(layers, i)
            mine = _local(groups.get((stack_key, i), []), layer)
            last = i + 1 == len(layers)
            if kind is not None:
                stats = _collect(layer, mine, kind, batches, calls, store, "h", advance=not mine and not last)
                if mine:
                    prune_layer(mine, stats)
                    del stats
                    if not last:  # the next layer's inputs come from this layer as pruned
                        _collect(layer, [], kind, batches, calls, store, "h", advance=True)
            else:
                _mask_by_weight(mine, config, layer_sparsity, generator, masks)
            names = finish(mine)
            tensors = {lazy.prefix(layers, i) + k: v for k, v in layer.state_dict().items()}
            writer.write(compress_tensors(tensors, names) if compact else tensors)
            del layer, mine, tensors
            return_freed_memory()
        head = _local(groups.get(None, []), model)
        for key, tensor in lazy.rest_tensors(layers):
            if head and head[0].name == key:  # blocks+head (magnitude / random): masked as it passes
                _load_into(model, key, tensor, lazy.device)
                _mask_by_weight(head, config, layer_sparsity, generator, masks)
                names = finish(head)
                tensor = head[0].weight().detach().to("cpu")
                head[0].module.to("meta")
            else:
                names = set()
            writer.write(compress_tensors({key: tensor}, names) if compact else {key: tensor})
            del tensor  # before the generator reads the next one
        if use_cache is not None:  # saved as the model had it
            model.config.use_cache = use_cache
        stage_checkpoint(model, txn, state_dict={})
        writer.finish()
        (staging / SPARSITY_FILE).write_text(json.dumps({"compact": bool(compact), **plan.to_dict()}, indent=1,
                                                        sort_keys=True) + "\n")
        result = SparsityResult(plan, model, time.perf_counter() - start, kept_masks,
                                {"head" if k is None else f"{k[0]}.{k[1]}": v for k, v in layer_sparsity.items()})
        if stage is not None:
            stage(staging, result)
    return result


def _mask_by_weight(mine: list, config: SparsityConfig, layer_sparsity: dict, generator, masks: dict) -> None:
    """magnitude / random: each target's mask from its own weight (or the seeded stream), applied in place."""
    pattern = config.parsed_pattern
    for t in mine:
        scores = magnitude_scores(t.weight()) if config.criterion == "magnitude" else random_scores(t.weight(),
                                                                                                   generator)
        masks[t.name] = mask_for(scores, pattern, layer_sparsity[t.layer]).cpu()
    apply_masks(mine, masks)


def _load_into(model, key: str, tensor: torch.Tensor, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, key, device, value=tensor)

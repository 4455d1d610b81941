# Copyright hfprune contributors. Apache-2.0.
"""Sequential (layer-by-layer) pruning of a model that need not fit in memory: :func:`prune_sequential`.

The model is built on the meta device (:class:`~hfprune.pruning.lazy.LazyModel`); only the embeddings (and the other
tensors outside the layer stack but an untied head) are loaded. The calibration batches run through them up to the
first layer, whose call is recorded, and they go back to the meta device; then the layers are loaded from the
checkpoint one at a time:

1. **Statistics pass** (dense stream): each layer runs on the previous dense layer's output, while the criterion's
   per-block statistics (:meth:`~hfprune.pruning.importance.Importance.block_stats`) and, for bias compensation,
   the output projections' mean inputs are summed. These are exactly the quantities ``hfprune.prune`` reads from
   the dense model in memory, so selection (any scope, parameter or MAC budget, or head/FFN ratios) then runs on
   the meta model's costs and gives the same plan.
2. **Reconstruction pass** (pruned stream): each layer is loaded again, reconstructed by structured OBS on the
   *pruned* previous layers' output (:func:`~hfprune.pruning.recovery.obs.reconstruct_layer`, as in memory) or
   bias-compensated, sliced, and written as one safetensors shard into the save's staging folder. The config,
   plan file and modeling code come from ``apply_plan`` on the meta model; the save commits atomically at the end.

Peak memory: two copies of one layer, the reconstruction's input Hessian of one projection (float64), and the
calibration hidden states (on disk with ``offload_dir``). The embeddings are in memory only while the first layer's
inputs are recorded, before any layer is loaded; the tensors outside the layers are copied into the new checkpoint
one at a time at the end. A data-free criterion (magnitude) reads each layer's weights once and runs no forward pass.
"""

from __future__ import annotations

import logging
import time

import torch

from ..core import cost
from ..core.apply import apply_plan, model_dims
from ..core.arch import get_adapter
from ..core.blocks import layer_blocks, merged_weight
from ..core.calibration import calibration_batches, check_batches, first_examples, iterate, to_device, token_rows
from ..core.checkpoint.save import stage_checkpoint
from ..core.checkpoint.transaction import Transaction, check_target
from ..core.layerwise import first_layer_call, layer_hidden, run_layer, without_hidden
from ..core.structure import apply_structure, base_layer, get_module
from . import budget as select
from .config import PruningConfig, require_config
from .importance.base import WEIGHTS, layerwise
from .lazy import LazyModel, return_freed_memory
from .oneshot import PruneResult, check_budget, select_kept
from .recovery.bias import add_zero_biases, bias_flags_needed, compensation
from .recovery.obs import DAMP, reconstruct_layer
from .recovery.tunable import tunable
from .seqio import HiddenStore, ShardWriter, check_writable, layer_pass

logger = logging.getLogger("hfprune")

# Families whose layers all take the same call (one mask, one set of position embeddings) and whose layers' outputs
# feed the next layer directly; the in-memory OBS replay checks the same thing on a live model.
SEQUENTIAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta", "xlm-roberta", "electra",
                          "distilbert")


def sequential_problem(config: PruningConfig) -> str | None:
    """Why ``config`` cannot run layer by layer (naming the path that can), or ``None`` when it can."""
    cls = config.criterion_class
    if getattr(config, "scope", None) == "search":  # hfprune.pruning.search scores candidates on the whole model
        return ("scope='search' scores whole candidate models; the in-memory path (hfprune.prune, hfprune prune "
                "--no-sequential) runs it")
    if getattr(config, "target", "blocks") != "blocks":  # the hidden size runs through every layer at once
        return (f"target={config.target!r} changes every layer's width together; the in-memory path "
                "(hfprune.prune, hfprune prune --no-sequential) runs it")
    if not layerwise(cls):
        return (f"criterion {config.criterion!r} reads {cls.signal.replace('_', ' ')} of the whole model, which a "
                "layer-by-layer pass cannot give; the in-memory path (hfprune.prune, hfprune prune --no-sequential) "
                "runs it")
    mode = config.resolved_recovery
    if mode not in ("none", "obs"):
        return (f"recovery {mode!r} needs the whole model in memory; the in-memory path (hfprune.prune, hfprune prune "
                "--no-sequential) runs it, or use recovery 'obs' or 'none'")
    if config.budget_kind == "latency":
        return ("latency_ratio is decided from latencies measured on the whole model in memory; the in-memory path "
                "(hfprune.prune, hfprune prune --no-sequential) decides it, or give params_ratio / macs_ratio")
    return None


def check_family(model) -> tuple:
    """``(stack key, StackSpec, layers)`` of a model sequential pruning can run, or a ``ValueError`` saying why not."""
    model_type = model.config.model_type
    if model_type not in SEQUENTIAL_MODEL_TYPES:
        raise ValueError(f"sequential pruning does not support model_type {model_type!r}; it supports "
                         f"{', '.join(SEQUENTIAL_MODEL_TYPES)}. Use the in-memory path (hfprune.prune, hfprune prune "
                         "--no-sequential)")
    kinds = set(getattr(model.config, "layer_types", None) or ())
    if len(kinds) > 1:  # each kind of layer gets its own mask: one recorded call does not fit them all
        raise ValueError(f"this {model_type} model mixes layer types {sorted(kinds)}; sequential pruning needs one "
                         "(use the in-memory path: --no-sequential)")
    spec = get_adapter(model).arch_spec(model.config)
    (stack_key, stack), = spec.stacks.items()
    return stack_key, stack, get_module(model.base_model, stack.layers)


def prune_sequential(model_dir, calibration, config: PruningConfig, output_dir, *, dtype=None,
                     offload_dir=None, model_class=None, stage=None, device=None) -> PruneResult:
    """Prune the checkpoint in ``model_dir`` layer by layer into ``output_dir``; the same plan and weights as
    ``hfprune.prune`` on the loaded model with the same ``calibration`` and ``config``.

    ``calibration``: model-ready batches (or a tokenised ``datasets.Dataset``), ``None`` for magnitude.
    ``dtype``: what the weights are loaded and pruned in (default: the checkpoint's); ``device``: where each layer
    runs (default: the GPU when there is one, else the CPU). ``offload_dir``: keep the
    calibration hidden states there between layers instead of in memory. ``stage(folder, result)`` may write more
    files (a tokenizer, the results) into the save before it commits. Returns a
    :class:`~hfprune.pruning.oneshot.PruneResult` whose ``model`` is the pruned model on the meta device. Every
    check runs before anything is written.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune import PruningConfig
    >>> from hfprune.pruning.sequential import prune_sequential
    >>> dense, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                              num_attention_heads=4, num_key_value_heads=2)).save_pretrained(dense)
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    >>> config = PruningConfig(criterion="fluctuation", params_ratio=0.9, scope="uniform", recovery="obs")
    >>> result = prune_sequential(dense, batches, config, out)
    >>> result.after.params < result.before.params
    True
    ```
    """
    start = time.perf_counter()
    config = require_config(config)
    problem = sequential_problem(config)
    if problem:
        raise ValueError(problem)
    check_target(output_dir)
    if offload_dir is not None:
        check_writable(offload_dir)
    lazy = LazyModel(model_dir, dtype=dtype, model_class=model_class, device=device)
    model = lazy.model
    stack_key, stack, layers = check_family(model)
    criterion = config.build_importance()
    mode = config.resolved_recovery
    batches = []
    if criterion.needs_data or mode == "obs" or config.bias_compensation:
        if calibration is None:
            raise ValueError(f"criterion {config.criterion!r} with recovery {mode!r} and bias_compensation="
                             f"{config.bias_compensation} needs calibration data")
        calibration = check_batches(model, calibration)
        batches = list(calibration_batches(calibration, config.calibration_batch_size))
    if config.bias_compensation:
        bias_flags_needed(model)  # a family whose config cannot add the bias: refused before any pass
    check_budget(model, config)
    lazy.rest_keys(layers)  # a head the checkpoint lacks: refused before any pass
    before = cost.estimate(model, seq_len=config.seq_len)
    recovery = first_examples(batches, config.recovery_examples) if mode == "obs" or config.bias_compensation else []
    with layer_pass(model, offload_dir) as (store, use_cache):
        streams = _streams(batches, recovery if config.bias_compensation else [])
        data = criterion.signal != WEIGHTS or config.bias_compensation
        dense_calls, calls = [], []
        if data or mode == "obs":
            # the embeddings serve only the first layer's inputs: record every stream's (the pruned stream
            # starts from the same embeddings), then release them: no layer pass holds them (~18% of a 1B Llama)
            lazy.load_rest(layers)
            dense_calls = record_first_calls(model, layers, [b for b, _, _ in streams], store, "d") if data else []
            calls = record_first_calls(model, layers, recovery, store, "r") if mode == "obs" else []
            lazy.unload_rest()
        scores, means = _statistics(lazy, stack_key, stack, layers, criterion, streams if data else [],
                                    dense_calls, store)
        kept, _ = select_kept(model, scores, config)
        logger.info("sequential: plan selected from %d layers' statistics; reconstructing (%s)", len(layers), mode)
        done: dict = {}

        def staged(folder):  # the pruned meta model is complete; the save has not committed yet
            after = cost.estimate(model, seq_len=config.seq_len)
            done["result"] = PruneResult(model.hfprune_plan, model, before, after, time.perf_counter() - start,
                                         scores, "bias" if config.bias_compensation else mode)
            if stage is not None:
                stage(folder, done["result"])

        _reconstruct(lazy, stack_key, stack, layers, kept, config, means, recovery, calls, store, output_dir,
                     staged, use_cache)
    return done["result"]


def _streams(batches: list, recovery: list) -> list:
    """``[(batch, scored, for recovery)]``: the calibration batches, and the last recovery batch again where
    ``recovery_examples`` cut it (in memory it runs as a batch of its own too)."""
    out = [(b, True, j < len(recovery) and recovery[j] is b) for j, b in enumerate(batches)]
    if recovery and recovery[-1] is not batches[len(recovery) - 1]:
        out.append((recovery[-1], False, True))
    return out


def write_rest(lazy, layers, writer: ShardWriter) -> None:
    """Copy the tensors outside the layers (embeddings, final norm, head) from the checkpoint into shards of their
    own, one tensor at a time: the embeddings and an untied head are never in memory together."""
    for key, tensor in lazy.rest_tensors(layers):
        writer.write({key: tensor})
        del tensor  # before the generator reads the next one


def record_first_calls(model, layers, batches: list, store: HiddenStore, tag: str) -> list:
    """Record the first layer's call for every batch; its hidden states go to ``store``, the rest is returned."""
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    calls = []
    for j, batch in enumerate(batches):
        call = first_layer_call(model, layers[0], to_device(batch, device))
        store.put(f"{tag}{j}", layer_hidden(call))
        calls.append(without_hidden(call))
    return calls


def _statistics(lazy, stack_key, stack, layers, criterion, streams, calls, store) -> tuple:
    """Pass 1 on the dense stream: ``({block key: scores}, {block key: mean output-projection input})``, the means
    over the recovery batches of ``streams`` (for bias compensation); ``streams`` empty: the weights alone."""
    scores, means = {}, {}
    for i in iterate(range(len(layers)), "sequential statistics"):
        layer = lazy.load_layer(layers, i)
        blocks = [b for b in layer_blocks(stack_key, i, layer, stack)]
        stats: dict = {}
        handles = []
        current: dict = {}
        for block in blocks:
            if block.units:
                handles.append(block.output_projection().register_forward_pre_hook(
                    _watch(block, criterion, stats, current)))
        try:
            for j, (batch, scored, for_recovery) in enumerate(streams):
                current.update(batch=batch, scored=scored and criterion.signal != WEIGHTS, bias=for_recovery)
                hidden = run_layer(layer, store.get(f"d{j}"), calls[j])
                if i + 1 < len(layers):
                    store.put(f"d{j}", hidden)
        finally:
            for h in handles:
                h.remove()
        for block in blocks:
            key = block.key
            if not block.units:
                scores[key] = torch.zeros(0)
            elif criterion.signal == WEIGHTS:
                scores[key] = criterion.block_score(block, None, None).float()
            else:
                named = {n: v for (k, n), v in stats.items() if k == key and n not in ("rows", "bias", "bias_rows")}
                scores[key] = criterion.block_score(block, named, torch.tensor(float(stats[key, "rows"]))).float()
            if (key, "bias") in stats:
                means[key] = stats[key, "bias"] / torch.tensor(float(stats[key, "bias_rows"]), dtype=torch.float64)
        del layer
        return_freed_memory()
    return scores, means


def _watch(block, criterion, stats: dict, current: dict):
    """Pre-hook on a block's output projection: sums the criterion's statistics over the scored batches and the
    inputs (for bias compensation's means) over the recovery batches, in batch order as the in-memory passes do."""
    key, units = block.key, block.units

    def hook(_m, args):
        x = token_rows(args[0].detach(), current["batch"])  # padding positions are not tokens
        if current["scored"]:
            for name, value in criterion.block_stats(x, units).items():
                stats[key, name] = stats.get((key, name), 0) + value
            stats[key, "rows"] = stats.get((key, "rows"), 0) + x.shape[0]
        if current["bias"]:
            stats[key, "bias"] = stats.get((key, "bias"), 0) + x.double().sum(0)
            stats[key, "bias_rows"] = stats.get((key, "bias_rows"), 0) + x.shape[0]

    return hook


def _reconstruct(lazy, stack_key, stack, layers, kept, config, means, recovery, calls, store, output_dir, stage,
                 use_cache) -> dict:
    """Pass 2: reconstruct or compensate, slice and write each layer; then the config, plan and code. Returns the
    kept units (OBS re-picks FFN neurons)."""
    model = lazy.model
    spec = get_adapter(model).arch_spec(model.config)
    obs = config.resolved_recovery == "obs"
    kept = dict(kept)
    units = {key: size[0] for key, size in _block_sizes(model).items()}
    pruned = {key for key, keep in kept.items() if keep is not None and len(keep) < units[key]}
    flags = {}
    if config.bias_compensation:
        flags = bias_flags_needed(model, [(k, m) for k, m, w in _tunable_all(model, stack_key, stack, layers)
                                          if k in pruned])
    txn = Transaction(output_dir, weights=("model.safetensors", "model.safetensors.index.json"))
    with txn as staging:
        writer = ShardWriter(staging, total=len(layers) + len(lazy.rest_keys(layers)))
        for i in iterate(range(len(layers)), "sequential pruning"):
            layer = lazy.load_layer(layers, i)
            blocks = list(layer_blocks(stack_key, i, layer, stack))
            mine = [(k, m, w) for k, m, w in tunable(blocks) if k in pruned]
            if obs:
                hidden = [store.get(f"r{j}") for j in range(len(recovery))]
                kept.update(reconstruct_layer(layer, mine, hidden, calls, recovery, kept, stack.ffn, DAMP))
                if i + 1 < len(layers):
                    for j, (h, call) in enumerate(zip(hidden, calls)):
                        store.put(f"r{j}", run_layer(layer, h, call))
                del hidden
            if config.bias_compensation:
                deltas = {k: compensation(merged_weight(m), means[k], kept[k], w) for k, m, w in mine}
                for name in flags:
                    add_zero_biases(blocks, name)
                for key, module, _ in mine:
                    bias = base_layer(module).bias
                    bias.add_(deltas[key].to(bias.device, bias.dtype))
            entry = {b.key.name: list(kept[b.key]) for b in blocks if b.key in pruned}
            layers[i], meta = layer, layers[i]  # the structure engine slices the model's layer i: lend it this one
            try:
                apply_structure(model.base_model, model.config, spec, {stack_key: [{}] * i + [entry]})
            finally:
                layers[i] = meta
            writer.write({lazy.prefix(layers, i) + k: v for k, v in layer.state_dict().items()})
            del layer
            return_freed_memory()
        write_rest(lazy, layers, writer)
        for name, flag in flags.items():  # the meta model gets what every layer got, so its config says so
            add_zero_biases((b for j in range(len(layers)) for b in layer_blocks(stack_key, j, layers[j], stack)),
                            name)
            setattr(model.config, flag, True)
        if use_cache is not None:  # saved as the model had it
            model.config.use_cache = use_cache
        plan = select.to_plan(kept, model_dims(model), model.config.model_type)
        apply_plan(model, plan)
        stage_checkpoint(model, txn, state_dict={})
        writer.finish()
        if stage is not None:
            stage(staging)
    return kept


def _block_sizes(model) -> dict:
    return {(key, i, name): size for key, rows in model_dims(model).items() for i, row in enumerate(rows)
            for name, size in row.items()}


def _tunable_all(model, stack_key, stack, layers) -> list:
    return tunable(b for i in range(len(layers)) for b in layer_blocks(stack_key, i, layers[i], stack))

# Copyright hfprune contributors. Apache-2.0.
"""Depth pruning of a model on disk, one layer at a time: :func:`depth_sequential`.

A first pass runs the calibration batches through the layers one at a time and sums each layer's block influence
(:func:`hfprune.pruning.depth.token_influence`: ``1 - cos`` of its input and output hidden states, padding left
out), as :func:`~hfprune.pruning.depth.block_influence` does on a model in memory; :func:`~hfprune.pruning.depth.
depth_plan` then chooses the layers to drop from those scores and the meta model's parameter counts, so the plan is
the in-memory one. A second pass copies the kept layers, renumbered, into the new checkpoint, shard by shard.
"""

from __future__ import annotations

import torch

from ..core import cost
from ..core.apply import apply_plan
from ..core.calibration import calibration_batches, check_batches, iterate
from ..core.checkpoint.save import stage_checkpoint
from ..core.checkpoint.transaction import Transaction, check_target
from ..core.layerwise import run_layer
from .depth import depth_plan, token_influence
from .lazy import LazyModel
from .seqio import ShardWriter, check_writable, layer_pass
from .sequential import check_family, record_first_calls, write_rest


def depth_sequential(model_dir, calibration, output_dir, *, params_ratio: float | None = None,
                     params: int | None = None, num_drop: int | None = None, protect=(), dtype=None,
                     offload_dir=None, stage=None, device=None) -> tuple:
    """Drop the least influential layers of the checkpoint in ``model_dir`` into ``output_dir``, layer by layer;
    the budget is one of ``params_ratio`` / ``params`` / ``num_drop`` as in :func:`~hfprune.pruning.depth.
    depth_plan`. Returns ``(plan, influence, cost before, cost after)``; ``stage(folder)`` may add files to the save
    before it commits. Every check runs before anything is written."""
    check_target(output_dir)
    if offload_dir is not None:
        check_writable(offload_dir)
    lazy = LazyModel(model_dir, dtype=dtype, device=device)
    model = lazy.model
    stack_key, stack, layers = check_family(model)
    if calibration is None:
        raise ValueError("depth pruning by block influence needs calibration data")
    batches = list(calibration_batches(check_batches(model, calibration)))
    depth_plan(model, influence=torch.zeros(len(layers)), params_ratio=params_ratio, params=params,
               num_drop=num_drop, protect=protect)  # a budget it cannot meet: refused before any pass
    lazy.rest_keys(layers)
    before = cost.estimate(model)
    with layer_pass(model, offload_dir) as (store, _):
        lazy.load_rest(layers)
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
        calls = record_first_calls(model, layers, batches, store, "d")
        lazy.unload_rest()  # only the first layer's inputs needed the embeddings
        sums = torch.zeros(len(layers), dtype=torch.float64)
        counts = torch.zeros(len(layers), dtype=torch.float64)
        for i in iterate(range(len(layers)), "block influence"):
            layer = lazy.load_layer(layers, i)
            for j, batch in enumerate(batches):
                hidden = store.get(f"d{j}")
                out = run_layer(layer, hidden, calls[j])
                total, n = token_influence(hidden, out, batch.get("attention_mask"))
                sums[i] += float(total)
                counts[i] += n
                store.put(f"d{j}", out)
            del layer
        influence = (sums / counts.clamp(min=1)).float()
    plan = depth_plan(model, influence=influence, params_ratio=params_ratio, params=params, num_drop=num_drop,
                      protect=protect)
    kept = [i for i, layer in enumerate(plan.layers) if not layer.drop]
    txn = Transaction(output_dir, weights=("model.safetensors", "model.safetensors.index.json"))
    with txn as staging:
        writer = ShardWriter(staging, total=len(kept) + len(lazy.rest_keys(layers)))
        for new, i in enumerate(iterate(kept, "copying kept layers")):
            layer = lazy.load_layer(layers, i)
            writer.write({lazy.prefix(layers, new) + k: v for k, v in layer.state_dict().items()})
            del layer
        write_rest(lazy, layers, writer)
        apply_plan(model, plan)
        stage_checkpoint(model, txn, state_dict={})
        writer.finish()
        if stage is not None:
            stage(staging)
    return plan, influence, before, cost.estimate(model)

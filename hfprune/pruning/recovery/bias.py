# Copyright hfprune contributors. Apache-2.0.
"""Bias compensation (An et al. 2024, FLAP).

A removed head's or neuron's output is replaced by its mean over the calibration tokens, which is a constant vector
folded into the output projection's bias. Families without that bias get one where their stock config can say so
(Llama's ``attention_bias`` / ``mlp_bias``), so the result is still a plain checkpoint.

The math is in a pure function (:func:`compensation`); :func:`compensate_biases` runs the calibration pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.arch import get_adapter
from ...core.blocks import base_layer, bias_of, iter_blocks, merged_weight
from ...core.calibration import device_batches, iterate, reduce_across_processes, token_rows
from ...core.structure import in_features, out_features
from .tunable import tunable_blocks


def compensation(weight: torch.Tensor, mean: torch.Tensor, keep: list, width: int = 1) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]``: the average contribution of the units not in ``keep`` to the output of a
    projection with (out, units * width) ``weight`` whose mean input is ``mean``. Float64."""
    units = weight.shape[1] // width
    removed = sorted(set(range(units)) - set(keep))
    if not removed:
        return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    cols = (torch.as_tensor(removed, device=weight.device)[:, None] * width
            + torch.arange(width, device=weight.device)).flatten()
    return weight[:, cols].double() @ mean.to(weight.device)[cols].double()


def mean_inputs(model: nn.Module, modules: dict, batches: list) -> dict:
    """``{key: mean input vector}`` of each module in ``modules`` over the (non-padding) tokens of ``batches``,
    from one pass of the model as it is."""
    sums: dict = {}
    counts: dict = {}
    batch_ref: dict = {}

    def watch(key, module):
        def pre_hook(_m, args, kwargs):
            x = token_rows((args[0] if args else kwargs["input"]).detach(), batch_ref["b"]).double()
            sums[key] = sums.get(key, 0) + x.sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    handles = [watch(key, module) for key, module in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                batch_ref["b"] = batch
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    # every rank reduces every key (zeros where it saw nothing), so all ranks fold the same biases
    device = next(model.parameters()).device
    zeros = {k: torch.zeros(in_features(m), dtype=torch.float64, device=device) for k, m in modules.items()}
    sums = reduce_across_processes({k: sums.get(k, z) + z for k, z in zeros.items()})
    counts = reduce_across_processes({k: torch.tensor(float(counts.get(k, 0)), dtype=torch.float64, device=device)
                                      for k in zeros})
    missing = sorted(str(k) for k in modules if float(counts[k]) == 0)
    if missing:
        raise RuntimeError(f"these output projections did not run in the calibration passes: {missing}")
    return {key: sums[key] / counts[key] for key in modules}


def compensate_biases(model: nn.Module, kept: dict, batches, max_examples: int | None = None) -> dict:
    """Fold the calibration mean of every unit that ``kept`` removes into its block's output-projection bias, in
    the dense ``model`` (before slicing). ``kept``: ``{block key: kept indices}`` (missing: kept whole).
    Returns ``{block key: the bias change}``.

    Where an output projection has no bias, the family's config flag for one (``Adapter.bias_flag``) is set and
    every projection of that block kind, in every layer, gets a zero bias first, so that stock transformers builds
    the same modules from the saved config. Families whose config cannot add the bias raise a ``ValueError``
    before anything changes. Autoformer's query-averaging attention is not compensated (as in mask tuning).
    """
    model = unwrap(model)
    pruned = [(key, module, width) for key, module, width in tunable_blocks(model)
              if key in kept and len(kept[key]) < in_features(module) // width]
    flags = bias_flags_needed(model, [(key, module) for key, module, _ in pruned])
    batches = device_batches(model, iterate(batches, "recovery data"), max_examples)
    means = mean_inputs(model, {key: module for key, module, _ in pruned}, batches)
    deltas = {key: compensation(merged_weight(module), means[key], kept[key], width)
              for key, module, width in pruned}
    for block, flag in flags.items():  # all checks and passes done: only now change the model
        _add_zero_biases(model, block)
        setattr(model.config, flag, True)
    with torch.no_grad():
        for key, module, _ in pruned:
            bias = base_layer(module).bias
            bias.add_(deltas[key].to(bias.device, bias.dtype))
    return {key: d.float().cpu() for key, d in deltas.items()}


def bias_flags_needed(model: nn.Module, blocks: list | None = None) -> dict:
    """``{block name: config flag}`` to set so that every output projection in ``blocks`` (``[(key, module)]``;
    default: all tunable blocks) has a bias. Raises a ``ValueError`` naming the block when the family's config
    cannot add one, or when a projection is a DoRA layer (its magnitude rescaling is not folded)."""
    model = unwrap(model)
    if blocks is None:
        blocks = [(key, module) for key, module, _ in tunable_blocks(model)]
    adapter = get_adapter(model)
    flags = {}
    for key, module in blocks:
        if any(True for _ in getattr(module, "lora_magnitude_vector", {})):
            raise ValueError(f"bias compensation does not support the DoRA layer of block {key}; "
                             "merge_and_unload() the adapter first, or use bias_compensation=False")
        if bias_of(module) is None:
            flag = adapter.bias_flag(model.config, key[2])
            if flag is None:
                raise ValueError(
                    f"bias compensation needs a bias on the output projection of block {key}; "
                    f"model_type {model.config.model_type!r} has none there and its config cannot add one. "
                    "Use bias_compensation=False for this model.")
            flags[key[2]] = flag
    return flags


def _add_zero_biases(model: nn.Module, block: str) -> None:
    """A zero bias on every projection of the attention or FFN blocks named ``block`` that has none."""
    add_zero_biases(iter_blocks(model), block)


def add_zero_biases(blocks, block: str) -> None:
    """:func:`_add_zero_biases` on the given :class:`~hfprune.core.blocks.Block` s (one layer's, for sequential
    pruning)."""
    for b in blocks:
        if b.key.name != block:
            continue
        for projection in b.projections():
            base = base_layer(projection)
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros(out_features(base), dtype=base.weight.dtype,
                                                     device=base.weight.device),
                                         requires_grad=base.weight.requires_grad)

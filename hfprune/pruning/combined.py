# Copyright hfprune contributors. Apache-2.0.
"""Weight sparsity inside :class:`~hfprune.pruning.callback.PruningCallback`: its arguments, and how weight masks
live beside the masks on heads and neurons.

The weight masks are a :class:`~hfprune.pruning.sparsity.callback.SparsityCallback`, which ``PruningCallback`` drives
from its own Trainer events. Two things tie it to the structure:

- while training, the weights of masked heads and neurons are left out of the sparsity ranking (they go when the
  model is sliced), so the sparsity asked for is a share of the weights the structure keeps;
- when training ends, each weight mask is cut to the rows and columns the plan keeps before the model is sliced,
  with the same indices the slicing uses (:meth:`hfprune.core.blocks.Block.unit_slices`, which also say which
  weights the masks on heads and neurons zero), and the cut masks go to the sliced weights.

Only unstructured weight masks combine with heads and neurons: removing input columns regroups N:M and block
patterns, so for those, slice first and then sparsify the sliced model.
"""

from __future__ import annotations

import torch

from ..core.blocks import get_block
from ..core.masking import Masks
from ..core.structure import base_layer, is_conv1d
from .config import PruningConfig, require_config
from .schedule import ScheduleConfig, prune_steps
from .sparsity.callback import SparsityCallback
from .sparsity.config import SparsityConfig
from .sparsity.targets import find_targets

KEEP = "keep"  # sparsity="keep": no new weight masks, the model's zeros when training starts stay zero


def split_arguments(config, schedule, calibration, sparsity, sparsity_schedule, rewind_step) -> tuple:
    """``(PruningConfig or None, SparsityCallback or None)`` from ``PruningCallback``'s arguments, each checked
    before anything is built."""
    for name, value in (("schedule", schedule), ("sparsity_schedule", sparsity_schedule)):
        if value is not None and not isinstance(value, ScheduleConfig):
            raise TypeError(f"{name} must be a hfprune.pruning.schedule.ScheduleConfig or None, got "
                            f"{type(value).__name__}")
    if isinstance(config, SparsityConfig):  # weights only: the schedule is theirs
        given = [name for name, value in (("sparsity", sparsity), ("sparsity_schedule", sparsity_schedule),
                                          ("calibration", calibration)) if value is not None]
        if given:
            raise ValueError(f"config is a SparsityConfig (single weights only), so {given} must be left out: the "
                             "schedule goes in schedule=, weight criteria score from the run itself; to prune heads "
                             "and neurons too, pass a PruningConfig as config and the SparsityConfig as sparsity=")
        return None, SparsityCallback(config, schedule, rewind_step)
    if not isinstance(config, PruningConfig) and not isinstance(config, dict):
        raise TypeError(f"config must be a hfprune.PruningConfig (heads, neurons) or a SparsityConfig (single "
                        f"weights), got {type(config).__name__} {config!r:.100}")
    config = require_config(config)
    if sparsity is None:
        extra = [name for name, value in (("sparsity_schedule", sparsity_schedule), ("rewind_step", rewind_step))
                 if value is not None]
        if extra:
            raise ValueError(f"{extra} go with weight sparsity: pass sparsity=SparsityConfig(...) too")
        return config, None
    if isinstance(sparsity, str) and sparsity == KEEP:
        if rewind_step is not None:
            raise ValueError(f"rewind_step={rewind_step!r} rewinds between weight-pruning rounds, which "
                             "sparsity='keep' does not run")
        sparse_config = None
    elif isinstance(sparsity, SparsityConfig):
        if sparsity.parsed_pattern.kind != "unstructured":
            raise ValueError(f"sparsity pattern={sparsity.pattern!r} with heads and neurons: removing input columns "
                             "regroups N:M and block patterns; use pattern='unstructured', or prune the structure "
                             "first and then sparsify the sliced model (hfprune.sparsify, or PruningCallback("
                             "SparsityConfig(...)) in a second run)")
        sparse_config = sparsity
    else:
        raise TypeError(f"sparsity must be a SparsityConfig, 'keep' or None, got {type(sparsity).__name__} "
                        f"{sparsity!r:.100}")
    return config, SparsityCallback(sparse_config, sparsity_schedule or schedule, rewind_step)


def check_before_training(structure: ScheduleConfig | None, sparse: SparsityCallback, model, args,
                          max_steps: int) -> None:
    """Before training: the model can carry weight masks (:meth:`SparsityCallback.check`), and weight pruning does
    not end before the structure's (``structure``: the schedule of heads and neurons, if any), whose later removals
    would take their share of the zeros with them and leave the sliced model below the sparsity asked for."""
    sparse.check(model, args)
    if structure is None or sparse.config is None:
        return
    last_structure = prune_steps(structure.resolve(max_steps))[-1]
    last_sparse = prune_steps(sparse.schedule.resolve(max_steps))[-1]
    if last_sparse < last_structure:
        raise ValueError(f"the weight sparsity schedule ends at step {last_sparse}, before the last pruning of heads "
                         f"and neurons at step {last_structure}; end sparsity_schedule at step {last_structure} or "
                         "later (sparsity_schedule=None follows the schedule of heads and neurons)")


def removed_slices(model, gates: dict, spec) -> list:
    """``[(parameter, dim, indices)]`` of every masked head and neuron: what they zero, and what slicing removes."""
    out = []
    for key, gate in gates.items():
        masked = torch.nonzero(gate.detach().cpu() == 0).flatten()
        if len(masked):
            out += get_block(model, key, spec).unit_slices(masked)
    return out


def structure_removed(targets: list, slices: list) -> dict:
    """``{weight name: bool (out, in)}``, True where ``slices`` (the masked heads and neurons) remove the weight;
    weights they do not touch are absent."""
    out = {}
    for t, parts in _parts_by_target(targets, slices):
        removed = torch.zeros(t.shape, dtype=torch.bool, device=t.weight().device)
        for dim, idx in parts.items():
            removed.index_fill_(dim, idx.to(removed.device), True)
        out[t.name] = removed
    return out


def cut_masks(sparse: SparsityCallback, model, plan) -> list:
    """Before ``model`` is sliced to ``plan``: ``[(module, mask)]``, each weight mask cut to the rows and columns
    ``plan`` keeps (the modules of the projections stay the same objects through the slicing)."""
    masks = Masks(model).set_plan(plan)  # the plan's kept units, validated against the model
    parts = dict((t.name, p) for t, p in _parts_by_target(sparse.targets, removed_slices(model, masks.gates,
                                                                                        masks.spec)))
    out = []
    for t in sparse.targets:
        mask = sparse.masks[t.name]
        for dim, idx in parts.get(t.name, {}).items():
            keep = torch.ones(mask.shape[dim], dtype=torch.bool)
            keep[idx] = False
            mask = mask.index_select(dim, torch.nonzero(keep).flatten().to(mask.device))
        out.append((t.module, mask))
    return out


def retarget(sparse: SparsityCallback, model, cut: list) -> None:
    """After the slicing: the sparsity engine's targets are the sliced projections, with the masks of
    :func:`cut_masks` (projections of blocks emptied by the slicing are gone)."""
    by_module = {id(module): (module, mask) for module, mask in cut}
    targets, masks = find_targets(model, sparse.config.targets if sparse.config else "blocks"), {}
    for t in targets:
        module, mask = by_module.get(id(t.module), (None, None))
        if module is not t.module or tuple(mask.shape) != t.shape:
            raise RuntimeError(f"{t.name}: no weight mask of shape {t.shape} was carried through the slicing")
        masks[t.name] = mask
    # scores and the rewind snapshot are of the dense shapes, and no weight is pruned after training
    sparse.targets, sparse.masks, sparse.movement, sparse.rewind, sparse.structure = targets, masks, {}, {}, None


def _parts_by_target(targets: list, slices: list):
    """``(target, {dim of its (out, in) weight: removed indices})`` for each target that ``slices`` touch."""
    by_param: dict = {}
    for param, dim, idx in slices:
        by_param.setdefault(id(param), []).append((dim, idx))
    for t in targets:
        base = base_layer(t.module)
        found = by_param.get(id(base.weight))
        if not found:
            continue
        parts: dict = {}
        for dim, idx in found:
            dim = 1 - dim if is_conv1d(base) else dim  # a Conv1D stores (in, out)
            parts[dim] = torch.cat([parts[dim], idx]) if dim in parts else idx
        yield t, {dim: torch.unique(idx.cpu()) for dim, idx in parts.items()}

# Copyright hfprune contributors. Apache-2.0.
"""Models whose parameters are sharded across ranks: FSDP2 (``torch.distributed.fsdp.fully_shard``, which
``accelerate`` applies with ``fsdp_version: 2``) turns every parameter into a ``DTensor`` holding one shard per rank.

What pruning needs from such a model, and only that: write zeros into the rows or columns of masked units on each
rank's own shard (:func:`fill_slices_`), and at the end gather the full weights once, on rank 0, into a plain copy
of the model that ``apply_plan`` can slice and ``save_pretrained`` can save (:func:`unsharded_copy`). Shapes, the
gates and the activations stay ordinary tensors under FSDP2, so scoring and planning need nothing else.

DeepSpeed ZeRO-3 partitions parameters its own way (flattened, invisible to module code outside its hooks):
:func:`check_supported_sharding` refuses it before anything changes.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

SUPPORTED = "single process, DDP (torchrun / accelerate launch --multi_gpu) and FSDP2 (fsdp_version: 2)"


def _dtensor_type():
    """``DTensor``, or ``None`` where torch has none (imported late: ``torch.distributed.tensor`` is not cheap)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a ``DTensor`` (FSDP2, or another torch.distributed.tensor sharding)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def local_range(param: torch.Tensor, dim: int) -> tuple:
    """``(start, length)``: the global indices along ``dim`` that this rank's shard of ``param`` holds
    (``(0, size)`` for a plain tensor, or a dimension that is not sharded)."""
    dtensor = _dtensor_type()
    size = param.shape[dim]
    if dtensor is None or not isinstance(param, dtensor):
        return 0, size
    from torch.distributed.tensor import Replicate, Shard

    dim = dim % param.dim()
    start, length = 0, size
    mesh = param.device_mesh
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim != dim):
            continue
        if type(placement) is not Shard:  # strided (FSDP + tensor parallel) or partial: not a layout we can index
            raise NotImplementedError(f"hfprune cannot locate the shard of a parameter placed as {param.placements}; "
                                      "FSDP2 (one Shard per mesh dimension) is supported")
        # torch.chunk semantics, as FSDP2 shards: the offset is relative to the enclosing shard
        length, offset = Shard.local_shard_size_and_offset(length, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
        start += offset
    if param.to_local().shape[dim] != length:
        raise RuntimeError(f"the local shard has {param.to_local().shape[dim]} entries along dim {dim}, expected "
                           f"{length}: an unexpected sharding layout {param.placements}")
    return start, length


def full_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the full tensor of a sharded one: a gathered copy (a collective), for reading only."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward without backward (the root module's, or all with
    ``reshard_after_forward=False``), so the next forward gathers the shards again, with what was written there."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def fill_slices_(targets, value: float = 0.0, model: nn.Module | None = None) -> None:
    """``param.index_fill_(dim, idx, value)`` for each ``(param, dim, idx)``, on a sharded parameter into the rows
    or columns its local shard holds (no communication). ``model``: the sharded model the parameters belong to,
    resharded first so that no stale unsharded copy outlives the write."""
    dtensor = _dtensor_type()
    if model is not None and is_sharded(model):
        reshard(model)
    with torch.no_grad():
        for param, dim, idx in targets:
            if dtensor is None or not isinstance(param, dtensor):
                param.index_fill_(dim, idx.to(param.device), value)
                continue
            start, length = local_range(param, dim)
            local = idx[(idx >= start) & (idx < start + length)] - start
            if len(local):
                param.to_local().index_fill_(dim, local.to(param.device), value)


def full_state_dict(model: nn.Module) -> dict:
    """Every weight of a sharded ``model`` at full size, on the CPU of rank 0 (``{}`` on the other ranks).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_class(model: nn.Module) -> type:
    """The model's class under FSDP2's ``FSDP<Class>`` (``fully_shard`` swaps the class of the module it wraps)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded transformers ``model`` with its full weights, on the CPU of rank 0;
    ``None`` on the other ranks. A collective: every rank calls it.

    Built on the meta device from a copy of the config (no initialisation, no second copy of the weights), then
    given the gathered weights; buffers outside the state dict (position ids, rotary frequencies) come from
    ``model``, where FSDP2 leaves them unsharded. Peak memory: the full model once, in rank 0's CPU memory.
    """
    state = full_state_dict(model)
    if torch.distributed.get_rank() != 0:
        return None
    from .checkpoint.classes import class_under
    from .checkpoint.load import pruned_class
    from .structure import HFPRUNE_CONFIG_KEY

    config = copy.deepcopy(model.config)
    base = class_under(unsharded_class(model))  # the transformers class, under FSDP2's and hfprune's
    # widths only a pruned record states (an earlier heterogeneous prune) are rebuilt from it
    cls = pruned_class(base) if getattr(config, HFPRUNE_CONFIG_KEY, None) else base
    with torch.device("meta"):
        plain = cls(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"the gathered weights have names the rebuilt {cls.__name__} does not: {unexpected[:5]}")
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            module = plain.get_submodule(owner) if owner else plain
            persistent = leaf not in getattr(module, "_non_persistent_buffers_set", set())
            module.register_buffer(leaf, buffers[name].detach().to("cpu").clone(), persistent=persistent)
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"no gathered value for {left[:5]} (missing from the state dict: {missing[:5]})")
    plan = getattr(model, "hfprune_plan", None)
    if plan is not None:  # a model pruned before this run: apply_plan composes with its record
        from .checkpoint.pruned import mark_pruned

        mark_pruned(plain, plan, heterogeneous=bool(getattr(model, "hfprune_heterogeneous", False)))
    plain.train(model.training)
    return plain


class SavesCompacted:
    """Mixin for a sharded model whose compacted (sliced, unsharded) copy lives on rank 0: ``save_pretrained``
    saves that copy, so ``trainer.save_model()`` writes the pruned checkpoint. The state dict the Trainer gathered
    from the sharded (masked, dense-sized) model is ignored; the other ranks write nothing."""

    hfprune_compacted: nn.Module | None = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        kwargs.pop("state_dict", None)
        is_main = kwargs.pop("is_main_process", True)
        if not is_main:
            return None
        if self.hfprune_compacted is None:  # a main process of another node (save_on_each_node): rank 0 has it
            raise RuntimeError("the compacted model is on global rank 0 only: save from there "
                               "(save_on_each_node=False)")
        return self.hfprune_compacted.save_pretrained(save_directory, *args, **kwargs)


_COMPACTED_CLASSES: dict = {}


def save_through(model: nn.Module, compacted: nn.Module | None) -> None:
    """Make ``model.save_pretrained`` save ``compacted`` (rank 0's sliced copy; ``None`` on other ranks)."""
    cls = type(model)
    if not issubclass(cls, SavesCompacted):
        if cls not in _COMPACTED_CLASSES:
            _COMPACTED_CLASSES[cls] = type(cls.__name__, (SavesCompacted, cls), {"__module__": cls.__module__})
        model.__class__ = _COMPACTED_CLASSES[cls]
    # not a submodule (nn.Module.__setattr__ would register it, into the sharded model's modules and state dict)
    object.__setattr__(model, "hfprune_compacted", compacted)


def compact_sharded(model: nn.Module, plan) -> nn.Module | None:
    """Slice a sharded ``model`` to ``plan`` the only way its shards allow: gather it into a plain copy on rank 0
    (:func:`unsharded_copy`), ``apply_plan`` there, and make ``model.save_pretrained`` (hence
    ``trainer.save_model()``) save that copy. Returns the copy on rank 0, ``None`` elsewhere. A collective."""
    from .apply import apply_plan

    plain = unsharded_copy(model)
    if plain is not None:
        apply_plan(plain, plan)
    save_through(model, plain)
    return plain


def check_training(model: nn.Module, args=None, calibration=None, latency: bool = False,
                   weight_gradients: bool = False) -> None:
    """What a pruning run under sharding cannot do, refused before the first step: DeepSpeed ZeRO-3; under FSDP2,
    a latency budget (measured by timing blocks on one device), scores from each rank's own weight gradients on
    calibration data (``weight_gradients``: FSDP2 averages them across ranks inside backward), and calibration data
    whose number of batches differs between ranks (each forward is a collective: a rank with fewer batches would
    leave the others waiting)."""
    check_supported_sharding(model, args)
    if not is_sharded(model):
        return
    if latency:
        raise ValueError("latency_ratio times each block on one device, which a sharded (FSDP2) model is not; use "
                         "macs_ratio or params_ratio, or measure latency on an unsharded copy and prune one-shot")
    if weight_gradients:
        raise ValueError("under FSDP2 a criterion scoring weight gradients on calibration data (taylor) is not "
                         "supported: FSDP2 averages the gradients across ranks inside backward; use it without "
                         "calibration (gate gradients from training), or fisher with calibration")
    if calibration is not None and hasattr(calibration, "__len__") and torch.distributed.is_initialized():
        n = len(calibration)
        count = torch.tensor([n, -n], dtype=torch.float64, device=next(model.parameters()).device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        if count[0] != -count[1]:
            raise ValueError(f"under FSDP2 every rank must score the same number of calibration batches (each forward "
                             f"is a collective); ranks have between {int(-count[1])} and {int(count[0])}")


def check_supported_sharding(model: nn.Module, args=None) -> None:
    """Raise ``NotImplementedError`` for DeepSpeed ZeRO-3, whose partitioned parameters hfprune cannot mask, score
    or slice, naming what is supported. ``args``: the run's ``TrainingArguments``."""
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 tags each partitioned parameter
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None and hasattr(ds_config, "is_zero3"):
        zero3 = zero3 or bool(ds_config.is_zero3())
    if not zero3 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    if not zero3:
        try:
            from transformers.integrations import is_deepspeed_zero3_enabled
        except ImportError:
            return
        zero3 = bool(is_deepspeed_zero3_enabled())
    if zero3:
        raise NotImplementedError(
            f"hfprune does not support DeepSpeed ZeRO-3 (parameters partitioned by DeepSpeed): masks, scores and the "
            f"final slicing need the parameters as modules hold them. Supported: {SUPPORTED}. For a model larger "
            "than one device, train with FSDP2 (accelerate `fsdp_version: 2`, or TrainingArguments(fsdp=True, "
            "fsdp_config={'version': 2, ...})); ZeRO stages 1 and 2 keep whole parameters but are untested.")

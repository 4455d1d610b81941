# Copyright hfprune contributors. Apache-2.0.
"""Part of the structure engine (see :mod:`hfprune.core.structure`): stand-ins for emptied blocks, module access and the
slicing primitives for Linear / Conv1D / LoRA layers. Copied into heterogeneous checkpoints under the same name."""

from __future__ import annotations

import torch
from torch import nn

# Modules that define the stand-ins below: this one, in hfprune and in a checkpoint, and the single-file engine of
# hfprune's earlier versions (``hfprune.core.structure``, and a checkpoint's ``modeling_hfprune``).
_ENGINE_MODULES = ("structure_modules", "modeling_hfprune_modules", "structure", "modeling_hfprune")


class _AnyCopy(type(nn.Module)):
    """``isinstance`` also accepts these classes from another copy of this file: a model loaded with
    ``trust_remote_code`` holds the ones its checkpoint's code defines, and pruning or measuring it again (here, or
    in that copy) must recognise them."""

    def __instancecheck__(cls, obj) -> bool:
        # checkpoints' modules are transformers_modules.<id>.<file>: compare the last part only
        return any(c.__name__ == cls.__name__ and c.__module__.rpartition(".")[2] in _ENGINE_MODULES
                   for c in type(obj).__mro__)


class EmptyAttention(nn.Module, metaclass=_AnyCopy):
    """Stands in for an attention module that has lost every head.

    Returns what the fully masked module returns: the output projection's bias (or zeros), or a
    zero-width context. With ``cache=True`` it still appends zero-head key/value states to a KV cache,
    so the cache's sequence-length bookkeeping (read from layer 0 by generation) stays right.
    """

    def __init__(self, kind: str, out_features: int, bias: torch.Tensor | None, returns: int,
                 head_dim: int, layer_idx: int | None = None, cache: bool = False):
        super().__init__()
        self.kind = kind
        self.out_features = out_features
        self.returns = returns
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.cache = cache
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        lead = hidden.shape[:-1]
        if self.kind == "context":
            out = hidden.new_zeros(*lead, 0)
        elif self.bias is not None:
            out = self.bias.to(hidden.dtype).expand(*lead, self.out_features)
        else:
            out = hidden.new_zeros(*lead, self.out_features)
        cache = kwargs.get("past_key_values")
        if self.cache and cache is not None and self.layer_idx is not None:
            empty = hidden.new_zeros(lead[0], 0, lead[1], self.head_dim)  # (B, 0 heads, T, hd)
            cache.update(empty, empty, self.layer_idx)
        if self.returns == 1:
            return out
        return (out,) + (None,) * (self.returns - 1)


class EmptyFfn(nn.Module, metaclass=_AnyCopy):
    """Stands in for an FFN with no neuron left: adds only its down projection's bias."""

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden, *args, **kwargs):
        if self.bias is None:
            return hidden.new_zeros(*hidden.shape[:-1], self.out_features)
        return self.bias.to(hidden.dtype).expand(*hidden.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------------------------
# Module access


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D stores its weight as (in, out); matched by name to keep this file standalone.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_layer(module: nn.Module) -> nn.Module:
    # peft LoRA/DoRA wrappers keep the wrapped layer in `.base_layer` (duck-typed: no peft import here).
    return module.base_layer if hasattr(module, "base_layer") and hasattr(module, "lora_A") else module


def out_features(module: nn.Module) -> int:
    base = base_layer(module)
    return base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]


def in_features(module: nn.Module) -> int:
    base = base_layer(module)
    return base.weight.shape[0] if is_conv1d(base) else base.weight.shape[1]


# ----------------------------------------------------------------------------------------------
# Slicing primitives. Keep-indices are sorted LongTensors; dtype, device and requires_grad survive.


def replace_param(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def slice_param(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    param = getattr(owner, name, None)
    if param is None:
        return
    with torch.no_grad():
        replace_param(owner, name, param.index_select(dim, keep.to(param.device)))


def slice_output(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features ``keep`` of a Linear / Conv1D / LoRA-wrapped linear."""
    base = base_layer(module)
    slice_param(base, "weight", 1 if is_conv1d(base) else 0, keep)
    slice_param(base, "bias", 0, keep)
    set_features(base, out=len(keep))
    if base is not module:
        for lora_b in module.lora_B.values():  # (out, r)
            slice_param(lora_b, "weight", 0, keep)
            slice_param(lora_b, "bias", 0, keep)  # peft's lora_bias=True
            set_features(lora_b, out=len(keep))
        for mag in getattr(module, "lora_magnitude_vector", {}).values():  # DoRA: one magnitude per output row
            slice_param(mag, "weight", 0, keep)
        set_features(module, out=len(keep))
        _clear_dora_caches(module)


def slice_input(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` of a Linear / Conv1D / LoRA-wrapped linear."""
    base = base_layer(module)
    if base is not module:
        _rescale_dora_magnitude(module, keep)
    slice_param(base, "weight", 0 if is_conv1d(base) else 1, keep)
    set_features(base, inp=len(keep))
    if base is not module:
        for lora_a in module.lora_A.values():  # (r, in)
            slice_param(lora_a, "weight", 1, keep)
            set_features(lora_a, inp=len(keep))
        set_features(module, inp=len(keep))
        _clear_dora_caches(module)
        if len(keep) == 0:
            _dora_to_lora(module)


def _rescale_dora_magnitude(module: nn.Module, keep: torch.Tensor) -> None:
    # DoRA scales each output row by magnitude / ||W + s*B@A||_row. Removing input columns shrinks that
    # norm, so the magnitude shrinks by the same ratio and the kept columns compute exactly as before.
    mags = getattr(module, "lora_magnitude_vector", None)
    if not mags:
        return
    base = base_layer(module)
    with torch.no_grad():
        for name, mag in mags.items():
            weight = base.weight.T if is_conv1d(base) else base.weight  # (out, in)
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            full = weight + module.scaling[name] * (b @ a)
            kept = full.index_select(1, keep.to(full.device))
            ratio = kept.norm(dim=1) / full.norm(dim=1).clamp_min(torch.finfo(full.dtype).tiny)
            replace_param(mag, "weight", mag.weight * ratio.to(mag.weight.dtype))


def _clear_dora_caches(module: nn.Module) -> None:
    # DoRA may cache the weight norm and B@A (peft's ENABLE_DORA_CACHING); both have the old shapes now.
    for mag in getattr(module, "lora_magnitude_vector", {}).values():
        if callable(getattr(mag, "_cache_clear", None)):
            mag._cache_clear()


def _dora_to_lora(module: nn.Module) -> None:
    # With no input column left, ||W + s*B@A||_row is 0 and DoRA's magnitude / norm is NaN (forward and merge).
    # The layer now outputs exactly its bias, as the masked layer does (its magnitude gets no gradient there
    # either, the masked input being 0), so its DoRA adapters become plain LoRA: same output, finite, mergeable.
    mags = getattr(module, "lora_magnitude_vector", None)
    for name in list(mags or ()):
        del mags[name]
        getattr(module, "lora_variant", {}).pop(name, None)
        if name in getattr(module, "use_dora", {}):
            module.use_dora[name] = False


def zero_input_output(module: nn.Module) -> torch.Tensor | None:
    """What a projection outputs for a zero input: its bias, plus ``scaling * lora_B.bias`` of each active,
    unmerged plain-LoRA adapter made with peft's ``lora_bias=True`` (B@A and DoRA's terms vanish at zero)."""
    base = base_layer(module)
    bias = base.bias
    if base is module or getattr(module, "disable_adapters", False):
        return bias
    skip = set(getattr(module, "merged_adapters", ())) | set(getattr(module, "lora_variant", ()))
    extra = [module.scaling[name] * module.lora_B[name].bias
             for name in getattr(module, "active_adapters", module.lora_B.keys())
             if name in module.lora_B and name not in skip and getattr(module.lora_B[name], "bias", None) is not None]
    if not extra:
        return bias
    with torch.no_grad():
        total = sum(extra) if bias is None else bias + sum(extra)
    return total.requires_grad_(bias is not None and bias.requires_grad)  # trainable only where the base bias is


def set_features(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    if is_conv1d(module):
        if out is not None:
            module.nf = out
        return
    if out is not None and hasattr(module, "out_features"):
        module.out_features = out
    if inp is not None and hasattr(module, "in_features"):
        module.in_features = inp


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads * head_dim) projection."""
    # (H, 1) * hd + (1, hd) -> (H, hd) -> (H * hd)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device="cpu")[None, :]).reshape(-1)


# ----------------------------------------------------------------------------------------------

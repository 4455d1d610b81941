# Copyright hfprune contributors. Apache-2.0.
"""Compact sparse weights: a bit mask (packed, uint8) and the kept values of each sparse weight, in safetensors.

A weight ``name`` of shape ``S`` is stored as three tensors: ``name.__bitmask`` (uint8, ``ceil(numel / 8)``
bytes; bit ``k % 8`` of byte ``k // 8`` says whether flat element ``k`` is kept), ``name.__values`` (the kept
elements in flat order, the weight's dtype) and ``name.__shape`` (int64, ``S``). ``sparsity_plan.json`` beside the
weights says ``"compact": true``. Pure tensor and file code: torch and safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPARSITY_FILE = "sparsity_plan.json"
MASK, VALUES, SHAPE = ".__bitmask", ".__values", ".__shape"
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 flat elements per byte (least significant bit first)."""
    flat = mask.flatten().to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    return (flat * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: a flat boolean tensor of ``numel`` elements."""
    bits = packed.to(torch.uint8).unsqueeze(1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.flatten()[:numel]


def compress(weight: torch.Tensor) -> dict:
    """``{MASK: bytes, VALUES: kept values, SHAPE: shape}`` of ``weight`` (kept: the nonzero elements)."""
    w = weight.detach().contiguous().cpu()
    keep = w.ne(0)
    return {MASK: pack_bits(keep), VALUES: w.flatten()[keep.flatten()].clone(),
            SHAPE: torch.tensor(list(w.shape), dtype=torch.int64)}


def decompress(bitmask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense weight back from :func:`compress`'s tensors (zeros where the mask is off)."""
    shape = [int(s) for s in shape.tolist()]
    numel = 1
    for s in shape:
        numel *= s
    keep = unpack_bits(bitmask, numel)
    if int(keep.sum()) != values.numel():
        raise ValueError(f"a compact sparse weight of shape {shape} has {int(keep.sum())} mask bits set but "
                         f"{values.numel()} values")
    out = values.new_zeros(numel)
    out[keep] = values
    return out.reshape(shape)


def compress_tensors(tensors: dict, names) -> dict:
    """``tensors`` with each of ``names`` present replaced by its three compact tensors."""
    out = {}
    for key, value in tensors.items():
        if key in names:
            out.update({key + suffix: t for suffix, t in compress(value).items()})
        else:
            out[key] = value
    return out


def decompress_tensors(tensors: dict) -> dict:
    """``tensors`` with every compact weight (``name.__bitmask`` and its siblings) made dense again."""
    out = {k: v for k, v in tensors.items() if not k.endswith((MASK, VALUES, SHAPE))}
    for key in tensors:
        if key.endswith(MASK):
            name = key[: -len(MASK)]
            missing = [name + s for s in (VALUES, SHAPE) if name + s not in tensors]
            if missing:
                raise ValueError(f"compact sparse weight {name!r}: {missing} missing from the checkpoint")
            out[name] = decompress(tensors[key], tensors[name + VALUES], tensors[name + SHAPE])
    return out


def is_compact(directory) -> bool:
    """Whether ``directory`` holds a compact sparse checkpoint (its ``sparsity_plan.json`` says so)."""
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("compact"))
    except (OSError, ValueError, AttributeError):
        return False


def read_compact(directory) -> dict | None:
    """The dense state dict of a compact sparse checkpoint in ``directory`` (every ``*.safetensors`` weight file
    the index names, or ``model.safetensors``), or ``None`` when it is not one."""
    if not is_compact(directory):
        return None
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors: dict = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return decompress_tensors(tensors)

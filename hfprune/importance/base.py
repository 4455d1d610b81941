# Copyright hfprune contributors. Apache-2.0.
"""The ``Importance`` interface, its registry, and the calibration pass shared by data-driven criteria."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..masking import Masks

_REGISTRY: dict = {}


class Importance:
    """Scores heads and neurons. ``needs_data`` criteria get calibration batches."""

    name: str = ""
    needs_data: bool = True

    def score(self, model: nn.Module, batches: Iterable | None = None) -> dict:
        raise NotImplementedError


def register_importance(cls: type) -> type:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"importance criterion name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def supported_importance() -> list:
    return sorted(_REGISTRY)


def get_importance(name: str, **kwargs) -> Importance:
    if name not in _REGISTRY:
        raise ValueError(f"unknown importance criterion {name!r}; supported: {', '.join(supported_importance())}")
    return _REGISTRY[name](**kwargs)


def require_data(name: str, batches) -> None:
    if batches is None:
        raise ValueError(f"the {name!r} criterion needs calibration data")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def iterate(batches: Iterable, desc: str):
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, leave=False)


def calibration_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's loss on ``batch``; without labels, cross-entropy against its own predictions
    (self-supervised, as Kwon et al. do for unlabeled calibration data)."""
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    logits = out.logits
    with torch.no_grad():
        target = logits.argmax(-1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def reduce_across_processes(scores: dict) -> dict:
    """Sum scores over torch.distributed ranks, so every rank selects the same plan."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for key in sorted(scores):
            torch.distributed.all_reduce(scores[key], op=torch.distributed.ReduceOp.SUM)
    return scores


def zero_scores(model: nn.Module) -> dict:
    return {k: torch.zeros_like(g) for k, g in Masks(model).gates.items()}

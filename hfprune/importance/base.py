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
    # True when scores estimate the loss change of removing a unit (gradient criteria), so they compare across
    # layers as they are; otherwise PruningConfig(normalize="auto") normalises them per block first
    loss_scale: bool = False

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


def iterate(batches, desc: str):
    batches = calibration_batches(batches)
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, leave=False)


def calibration_batches(data, batch_size: int = 32, tokenizer=None, collate_fn=None):
    """Model-ready batches from a DataLoader, a list (or other iterable) of dicts, or a ``datasets.Dataset``.

    A ``Dataset`` of tokenised columns is batched in order (``batch_size`` rows) and collated with ``collate_fn``,
    else ``DataCollatorWithPadding(tokenizer)`` when a tokenizer is given, else :func:`stack_features`. Columns
    that are not numbers (the raw ``text``) are left out; ``label`` becomes ``labels`` as the Trainer does.
    Anything else is returned as it is.
    """
    try:
        import datasets
    except ImportError:  # datasets is optional for users who pass batches
        return data
    if not isinstance(data, datasets.Dataset):
        return data
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    keep = [name for name, feature in data.features.items() if _numeric(feature)]
    if not keep:
        raise ValueError(f"the calibration dataset has no numeric (tokenised) columns: {list(data.features)}")
    if collate_fn is None:
        if tokenizer is not None:
            from transformers import DataCollatorWithPadding

            collate_fn = DataCollatorWithPadding(tokenizer)
        else:
            collate_fn = stack_features
    data = data.select_columns(keep)
    return [collate_fn([data[j] for j in range(i, min(i + batch_size, len(data)))])
            for i in range(0, len(data), batch_size)]


def _numeric(feature) -> bool:
    import datasets

    while isinstance(feature, (datasets.Sequence, datasets.List if hasattr(datasets, "List") else ())):
        feature = feature.feature
    if isinstance(feature, list):  # a plain list of a feature type
        return _numeric(feature[0]) if feature else False
    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string")


PAD_VALUES = {"labels": -100, "label": -100}


def stack_features(rows: list) -> dict:
    """Collate dataset rows without a tokenizer: stack equal-length values; pad unequal ones only when an
    ``attention_mask`` says which positions are padding (ids and masks with 0, labels with -100)."""
    out = {}
    for name in rows[0]:
        values = [torch.as_tensor(row[name]) for row in rows]
        lengths = {tuple(v.shape) for v in values}
        if len(lengths) > 1:
            if "attention_mask" not in rows[0] or any(v.dim() != 1 for v in values):
                raise ValueError(f"column {name!r} has rows of different lengths {sorted(lengths)[:3]}...; pass "
                                 "a tokenizer (padding collator) or collate_fn, or pad the dataset")
            values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True,
                                                     padding_value=PAD_VALUES.get(name, 0))
        else:
            values = torch.stack(values)
        out["labels" if name == "label" else name] = values
    return out


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

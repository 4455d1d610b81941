# Copyright hfprune contributors. Apache-2.0.
"""Calibration passes: batches on the model's device, token rows without padding, single-block captures.

Shared by the criteria that read activations and by the recovery steps (mask tuning, bias compensation, OBS), which
all look at one projection's inputs or outputs on calibration tokens. A lower layer than both: it imports only
torch, transformers and hfprune's core modules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class Stop(Exception):
    """Raised from a hook to end a forward pass once the block of interest has run."""


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_rows(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """``x`` (batch, seq, features) as (tokens, features) rows, without the padding positions of ``batch``'s
    attention mask (when the mask matches ``x``'s leading shape; other inputs keep every row)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        x = x[mask.to(x.device).bool()]  # a model split over devices: the mask stays on the first
    return x.reshape(-1, x.shape[-1])


def first_examples(batches: list, limit: int | None) -> list:
    """The leading batches holding ``limit`` examples (the last one cut), or all of them."""
    if limit is None:
        return batches
    out, seen = [], 0
    for batch in batches:
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        take = min(size, limit - seen)
        if take <= 0:
            break
        out.append(batch if take == size else
                   {k: v[:take] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v
                    for k, v in batch.items()})
        seen += take
    return out


def device_batches(model: nn.Module, batches: Iterable, max_examples: int | None = None) -> list:
    """``batches`` (model-ready dicts) as a list on the model's device, cut to the first ``max_examples``; a
    ``ValueError`` when that leaves none. Passes that run the model more than once need the list."""
    device = next(model.parameters()).device
    out = first_examples([to_device(b, device) for b in batches], max_examples)
    if not out:
        raise ValueError("the calibration data is empty")
    return out


def capture(model: nn.Module, module: nn.Module, batch: dict, what: str) -> torch.Tensor:
    """The input (``what='input'``) or output of ``module`` in one forward pass of ``model``, stopping there."""
    seen = {}

    def pre_hook(_m, args, kwargs):
        seen["t"] = (args[0] if args else kwargs["input"]).detach()
        raise Stop

    def hook(_m, _args, output):
        seen["t"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise Stop

    # with_kwargs pre-hooks run after the masks' gate hook (registered earlier) in registration order: the
    # captured input of a gated projection is read after its gate
    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True) if what == "input" \
        else module.register_forward_hook(hook)
    try:
        model(**batch)
    except Stop:
        pass
    finally:
        handle.remove()
    if "t" not in seen:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward pass")
    return seen["t"]

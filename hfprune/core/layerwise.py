# Copyright hfprune contributors. Apache-2.0.
"""Running a layer stack one layer at a time: the call a layer receives, and replaying a layer on other hidden
states. Structured OBS replays the stacks of a model in memory; sequential pruning (``hfprune.pruning.sequential``)
runs a model whose layers are on disk, one at a time, from the first layer's call.

A layer call is ``(args, kwargs)`` as a forward pre-hook sees it; its hidden states are the first positional
argument or one of :data:`HIDDEN_KWARGS`. Imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN_KWARGS = ("hidden_states", "hidden_state")  # what layers that take it by keyword call it


class _Reached(Exception):
    """Raised from the first layer's pre-hook: everything the layers need has been computed."""


def layer_hidden(call: tuple) -> torch.Tensor:
    """The hidden states a recorded layer call received: the first positional argument, else the keyword."""
    args, kwargs = call
    if args:
        return args[0]
    for name in HIDDEN_KWARGS:
        if name in kwargs:
            return kwargs[name]
    raise ValueError(f"a layer was called without hidden states by position or as one of {HIDDEN_KWARGS}")


def without_hidden(call: tuple) -> tuple:
    """``call`` with its hidden states left out (``None``): what a replay needs besides them, kept small."""
    args, kwargs = call
    if args:
        return (None, *args[1:]), kwargs
    return args, {k: None if k in HIDDEN_KWARGS else v for k, v in kwargs.items()}


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """Replay a recorded layer call on ``hidden``; the layer's output hidden states."""
    args, kwargs = call
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        name = next(n for n in HIDDEN_KWARGS if n in kwargs)
        out = layer(**{**kwargs, name: hidden})
    return out[0] if isinstance(out, tuple) else out


def first_layer_call(model: nn.Module, layer: nn.Module, batch: dict) -> tuple:
    """The call ``(args, kwargs)`` that ``layer`` (a stack's first layer) receives when ``model`` runs ``batch``;
    the forward pass stops there, so the layers themselves need no weights (they may be on the meta device)."""
    seen: list = []

    def pre_hook(_m, args, kwargs):
        seen.append((args, kwargs))
        raise _Reached

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(**batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(model).__name__} did not reach its first layer on this batch")
    return seen[0]

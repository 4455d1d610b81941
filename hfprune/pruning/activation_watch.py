# Copyright hfprune contributors. Apache-2.0.
"""Activation scores from the training run itself (``PruningCallback`` with criterion ``activation`` and no
calibration data): hooks on the input of every output projection sum each head's or neuron's terms over the
non-padding tokens of every training forward, until :meth:`ActivationWatch.flush` hands them over."""

from __future__ import annotations

import inspect

import torch

from ..core.calibration import token_rows, watch_output_projections
from ..core.distributed import mean_across_ranks


class ActivationWatch:
    """Hooks on ``model`` that add ``criterion.activation_terms`` of each block's gated input per training forward."""

    def __init__(self, model, criterion):
        self.model, self.criterion = model, criterion
        self.buffer: dict = {}
        self.handles: list = []

    def attach(self) -> ActivationWatch:
        current = {}
        signature = inspect.signature(self.model.forward)

        def remember_batch(_m, args, kwargs):  # the attention mask tells the hooks below which rows are padding
            try:
                current["attention_mask"] = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                current["attention_mask"] = kwargs.get("attention_mask")

        def forget_batch(_m, _args, _output):  # a later forward that skips the top level sees no stale mask
            current.clear()

        def make_hook(key, groups, _module):
            def hook(mod, args):
                if not mod.training:
                    return
                x = token_rows(args[0].detach().float(), current)  # (tokens, groups * width), already gated
                self.buffer[key] = self.buffer.get(key, 0) + self.criterion.activation_terms(x, groups)

            return hook

        self.handles.append(self.model.register_forward_pre_hook(remember_batch, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(forget_batch))
        self.handles.extend(watch_output_projections(self.model, make_hook))
        return self

    def flush(self, gates: dict) -> torch.Tensor | None:
        """The terms gathered since the last flush, flat in the order of ``gates`` and averaged across ranks (every
        rank calls it at the same step); ``None`` when nothing was gathered."""
        if not self.buffer:
            return None
        flat = torch.cat([self.buffer.get(k, torch.zeros(g.numel(), device=g.device)).to(g.device).flatten()
                          for k, g in gates.items()])
        self.buffer = {}
        return mean_across_ranks(flat)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

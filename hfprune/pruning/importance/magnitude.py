# Copyright hfprune contributors. Apache-2.0.
"""Magnitude: squared L2 norm of the weights that belong to each head or neuron.

A head owns its q rows and o columns, plus a 1/group share of its key/value group's k and v rows (GQA);
a neuron owns its up/gate rows and its down column. Needs no data.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.blocks import iter_blocks, weight_out_in
from .base import WEIGHTS, Importance, register_importance


def per_head(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over rows grouped in ``n`` consecutive equal blocks: (n * d, ...) -> (n,)."""
    return rows.reshape(n, -1).sum(1)


def head_and_neuron_terms(model: nn.Module, fn) -> dict:
    """Apply ``fn(weight_or_grad_rows)`` elementwise and sum it per head / neuron over coupled slices.

    ``fn`` maps a module to an (out, in) tensor of per-weight terms (e.g. ``w**2`` or ``|w * grad|``).
    """
    scores = {}
    for block in iter_blocks(unwrap(model)):
        if block.units == 0:  # emptied (an EmptyAttention / EmptyFfn may hold no projection any more)
            scores[block.key] = torch.zeros(0)
            continue
        if not block.is_attention:
            s = fn(block.output_projection()).sum(0)
            for up in block.input_projections():
                s = s + fn(up).sum(1)
            scores[block.key] = s.detach().float()
            continue
        heads, kv_heads, head_dim = block.dims()
        s = per_head(fn(block.output_projection()).sum(0), heads)  # (out, heads * hd) -> (heads,)
        if block.spec.fused_qkv:
            qkv = fn(block.input_projections()[0]).sum(1).reshape(3, heads, head_dim).sum(2)  # (3, heads)
            s = s + qkv.sum(0)
        else:
            q, k, v = block.input_projections()
            s = s + per_head(fn(q).sum(1), heads)
            group = heads // kv_heads
            kv = per_head(fn(k).sum(1), kv_heads) + per_head(fn(v).sum(1), kv_heads)
            s = s + (kv / group).repeat_interleave(group)
        scores[block.key] = s.detach().float()
    return scores


@register_importance
class MagnitudeImportance(Importance):
    name = "magnitude"
    signal = WEIGHTS

    def score(self, model, batches=None) -> dict:
        with torch.no_grad():
            return head_and_neuron_terms(model, lambda m: weight_out_in(m).float().pow(2))

# Copyright hfprune contributors. Apache-2.0.
"""Magnitude: squared L2 norm of the weights that belong to each head or neuron.

A head owns its q rows and o columns, plus a 1/group share of its key/value group's k and v rows (GQA);
a neuron owns its up/gate rows and its down column; a routed expert of a MoE layer its router row and all its
matrices, a neuron inside the experts its gate and up rows and down column. Needs no data.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.blocks import iter_blocks, weight_out_in
from ...core.experts import expert_terms
from ...core.sharded import full_view
from .base import WEIGHTS, Importance, register_importance


def per_head(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over rows grouped in ``n`` consecutive equal blocks: (n * d, ...) -> (n,)."""
    return rows.reshape(n, -1).sum(1)


def head_and_neuron_terms(model: nn.Module, fn) -> dict:
    """Apply ``fn(weight_or_grad_rows)`` elementwise and sum it per head / neuron over coupled slices.

    ``fn`` maps a module to an (out, in) tensor of per-weight terms (e.g. ``w**2`` or ``|w * grad|``).
    """
    # routed experts have no projections: the expert criteria (reap, frequency) score them, these leave them whole
    return {block.key: block_terms(block, fn) for block in iter_blocks(unwrap(model)) if not block.is_expert}


def block_terms(block, fn) -> torch.Tensor:
    """:func:`head_and_neuron_terms` of one :class:`~hfprune.core.blocks.Block`: ``(units,)``."""
    if block.units == 0:  # emptied (an EmptyAttention / EmptyFfn may hold no projection any more)
        return torch.zeros(0)
    if not block.is_attention:
        s = fn(block.output_projection()).sum(0)
        for up in block.input_projections():
            s = s + fn(up).sum(1)
        return s.detach().float()
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
    return s.detach().float()


@register_importance
class MagnitudeImportance(Importance):
    name = "magnitude"
    signal = WEIGHTS

    def block_score(self, block, stats=None, count=None) -> torch.Tensor:
        with torch.no_grad():
            if block.is_expert:
                return expert_terms(block, _param_squares)
            return block_terms(block, _squares)

    def score(self, model, batches=None) -> dict:
        with torch.no_grad():
            scores = head_and_neuron_terms(model, _squares)
            # routed experts of MoE layers: each expert's (or expert neuron's) weights, router row included
            scores.update({b.key: expert_terms(b, _param_squares) for b in iter_blocks(unwrap(model)) if b.is_expert})
            return scores


def _param_squares(param) -> torch.Tensor:
    return param.float().pow(2)


def _squares(module) -> torch.Tensor:
    return full_view(weight_out_in(module)).float().pow(2)  # FSDP2: the gathered weight

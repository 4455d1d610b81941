# Copyright hfprune contributors. Apache-2.0.
"""Magnitude: squared L2 norm of the weights that belong to each head or neuron.

A head owns its q rows and o columns, plus a 1/group share of its key/value group's k and v rows (GQA);
a neuron owns its up/gate rows and its down column. Needs no data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..apply import unwrap
from ..arch import get_adapter
from ..structure import _base_layer, _is_conv1d, attention_dims, get_module
from .base import Importance, register_importance


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever its storage (Linear, Conv1D, LoRA-wrapped)."""
    base = _base_layer(module)
    return base.weight.T if _is_conv1d(base) else base.weight


def per_head(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over rows grouped in ``n`` consecutive equal blocks: (n * d, ...) -> (n,)."""
    return rows.reshape(n, -1).sum(1)


def head_and_neuron_terms(model: nn.Module, fn) -> dict:
    """Apply ``fn(weight_or_grad_rows)`` elementwise and sum it per head / neuron over coupled slices.

    ``fn`` maps a module to an (out, in) tensor of per-weight terms (e.g. ``w**2`` or ``|w * grad|``).
    """
    model = unwrap(model)
    spec = get_adapter(model).arch_spec(model.config)
    scores = {}
    for key, stack in spec.stacks.items():
        for i, layer in enumerate(get_module(model.base_model, stack.layers)):
            for name, attn in stack.attention.items():
                heads, kv_heads, head_dim = attention_dims(layer, attn)
                if heads == 0:
                    scores[(key, i, name)] = torch.zeros(0)
                    continue
                o = fn(get_module(layer, attn.o))  # (out, heads * hd)
                s = per_head(o.sum(0), heads)
                if attn.fused_qkv:
                    qkv = fn(get_module(layer, attn.q)).sum(1).reshape(3, heads, head_dim).sum(2)  # (3, heads)
                    s = s + qkv.sum(0)
                else:
                    s = s + per_head(fn(get_module(layer, attn.q)).sum(1), heads)
                    group = heads // kv_heads
                    kv = per_head(fn(get_module(layer, attn.k)).sum(1), kv_heads)
                    kv = kv + per_head(fn(get_module(layer, attn.v)).sum(1), kv_heads)
                    s = s + (kv / group).repeat_interleave(group)
                scores[(key, i, name)] = s.detach().float()
            for name, ffn in stack.ffn.items():
                s = fn(get_module(layer, ffn.down)).sum(0)
                for path in ffn.up:
                    s = s + fn(get_module(layer, path)).sum(1)
                scores[(key, i, name)] = s.detach().float()
    return scores


@register_importance
class MagnitudeImportance(Importance):
    name = "magnitude"
    needs_data = False

    def score(self, model, batches=None) -> dict:
        with torch.no_grad():
            return head_and_neuron_terms(model, lambda m: weight_rows(m).float().pow(2))

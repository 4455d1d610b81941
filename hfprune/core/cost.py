# Copyright hfprune contributors. Apache-2.0.
"""Analytic cost: parameters and multiply-accumulates (MACs) per layer, before and after a plan.

Costs come from the projection shapes of the model as it is, scaled by what a plan keeps, without slicing
anything; so ``estimate(dense, plan).params`` predicts ``sum(p.numel())`` of ``apply_plan(dense, plan)``.
MACs count the projections (one MAC per weight per token) and the attention products (``QK^T`` and
``AV``: ``2 * heads * head_dim * seq_len`` per query token), for a self-attention length ``seq_len``; cross
attention is counted with the same length on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .apply import as_plan, unwrap
from .arch import get_adapter
from .blocks import Block, bias_of, iter_layers, layer_blocks
from .structure import in_features, out_features


@dataclass(frozen=True)
class LayerCost:
    stack: str
    index: int
    params: int
    macs: int
    heads: dict = field(default_factory=dict)  # block -> kept query heads
    neurons: dict = field(default_factory=dict)  # block -> kept neurons


@dataclass(frozen=True)
class CostReport:
    """Totals and per-layer costs; ``params`` counts the whole model, ``macs`` the transformer layers."""

    params: int
    macs: int
    seq_len: int
    layers: tuple

    def table(self) -> str:
        rows = [f"{'layer':<18}{'heads':>10}{'neurons':>10}{'params':>14}{'MACs':>16}"]
        for c in self.layers:
            heads = "/".join(str(v) for v in c.heads.values()) or "-"
            neurons = "/".join(str(v) for v in c.neurons.values()) or "-"
            rows.append(f"{c.stack + '[' + str(c.index) + ']':<18}{heads:>10}{neurons:>10}{c.params:>14,}{c.macs:>16,}")
        rows.append(f"{'total':<38}{self.params:>14,}{self.macs:>16,}")
        return "\n".join(rows)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias(module: nn.Module) -> int:
    b = bias_of(module)
    return 0 if b is None else b.numel()


def _attention_cost(block: Block, keep, seq_len: int) -> tuple:
    """(params now, params kept, MACs kept, kept heads) of one attention block."""
    if block.is_empty():
        return _numel(block.module()), _numel(block.module()), 0, 0
    heads, kv_heads, head_dim = block.dims()
    spec = block.spec
    projs = block.input_projections()
    o = block.output_projection()
    now = sum(_numel(p) for p in block.projections())
    if keep is not None and len(keep) == 0:
        # The whole module becomes an EmptyAttention (per-head norms and scales go too); only the output
        # projection's bias survives, inside it (``empty="bias"``) or on the outer projection ("context").
        inside = spec.o.startswith(spec.module + ".") if spec.module else True
        now = _numel(block.module()) + (0 if inside else _numel(o))
        return now, _bias(o), 0, 0
    n = heads if keep is None else len(keep)
    n_kv = kv_heads if keep is None else len({h // (heads // kv_heads) for h in keep})
    hidden = in_features(projs[0])
    if spec.fused_qkv:
        qkv_out = 3 * n * head_dim
        qkv_macs = hidden * qkv_out
        qkv_params = qkv_macs + (qkv_out if _bias(projs[0]) else 0)
    else:
        widths = (n * head_dim, n_kv * head_dim, n_kv * head_dim)
        qkv_macs = sum(hidden * w for w in widths)
        qkv_params = qkv_macs + sum(w for w, p in zip(widths, projs) if _bias(p))
    o_macs = n * head_dim * out_features(o)
    kept = qkv_params + o_macs + _bias(o)
    macs = seq_len * (qkv_macs + o_macs) + 2 * n * head_dim * seq_len * seq_len
    return now, kept, macs, n


def _ffn_cost(block: Block, keep, seq_len: int) -> tuple:
    """(params now, params kept, MACs kept, kept neurons) of one FFN block."""
    if block.is_empty():
        return _numel(block.module()), _numel(block.module()), 0, 0
    ups = block.input_projections()
    down = block.output_projection()
    now = sum(_numel(p) for p in block.projections())
    if keep is not None and len(keep) == 0 and block.spec.module is not None:
        # The whole block becomes an EmptyFfn that keeps only the down projection's bias.
        return _numel(block.module()), _bias(down), 0, 0
    n = out_features(ups[0]) if keep is None else len(keep)
    per_token = sum(in_features(u) * n for u in ups) + n * out_features(down)
    kept = per_token + sum(n for u in ups if _bias(u)) + _bias(down)
    return now, kept, seq_len * per_token, n


def estimate(model: nn.Module, plan=None, seq_len: int = 128) -> CostReport:
    """Cost of ``model`` as it is (``plan=None``) or as ``apply_plan(model, plan)`` would leave it."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    model = unwrap(model)
    spec = get_adapter(model).arch_spec(model.config)
    plan = as_plan(plan) if plan is not None else None
    planned = plan.stacks() if plan is not None else {}
    total = _numel(model)
    layers = []
    for key, i, layer, stack in iter_layers(model, spec):
        entries = planned.get(key)
        entry = entries[i] if entries else None
        layer_params = _numel(layer)
        if entry is not None and entry.drop:
            total -= layer_params
            continue
        params, macs, heads, neurons = layer_params, 0, {}, {}
        for block in layer_blocks(key, i, layer, stack):
            cost = _attention_cost if block.is_attention else _ffn_cost
            now, kept, m, units = cost(block, entry and entry.get(block.key.name), seq_len)
            (heads if block.is_attention else neurons)[block.key.name] = units
            params, macs = params - now + kept, macs + m
        total += params - layer_params
        layers.append(LayerCost(key, i, params, macs, heads, neurons))
    return CostReport(params=total, macs=sum(c.macs for c in layers), seq_len=seq_len, layers=tuple(layers))

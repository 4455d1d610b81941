# Copyright hfprune contributors. Apache-2.0.
"""Analytic cost: parameters and multiply-accumulates (MACs) per layer, before and after a plan.

Costs come from the projection shapes of the model as it is, scaled by what a plan keeps, without slicing
anything; so ``estimate(dense, plan).params`` predicts ``sum(p.numel())`` of ``apply_plan(dense, plan)``.
MACs count the projections (one MAC per weight per token) and the attention products (``QK^T`` and
``AV``: ``2 * heads * head_dim * seq_len`` per query token), for a self-attention length ``seq_len``; cross
attention is counted with the same length on both sides. Both come from :func:`unit_costs`, the per-head /
per-key/value-group / per-neuron costs that the budgets' selection (``hfprune.pruning.oneshot.blocks_for``) uses too.
A plan's ``hidden`` keep-list shrinks every parameter along the hidden size (embeddings, norms, every projection's
columns or rows that read or write the residual stream, the head) and the projections' MACs with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .apply import as_plan, unwrap
from .arch import get_adapter
from .blocks import Block, bias_of, iter_layers, layer_blocks
from .hidden import hidden_parameters, hidden_size
from .plan import expert_neurons
from .structure import expert_dims, get_module, in_features, out_features


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


@dataclass(frozen=True)
class UnitCost:
    """What one unit of a block costs, as the block is now: so what removing it saves, and what keeping ``n`` of
    them costs. The one cost model: :func:`estimate` and the budgets' selection both build on it.

    Per query head or neuron: ``params`` weights (a head's q rows and output-projection columns, with its k and v
    rows too when q/k/v are fused; a neuron's up/gate rows and down column), ``bias`` bias entries, ``macs`` at
    ``seq_len`` (one per weight per token, plus a head's ``QK^T`` and ``AV``). Per key/value group (its k and v
    rows; zero for a fused q/k/v and for FFNs): ``kv_params``, ``kv_bias``, ``kv_macs``. ``group``: query heads
    per key/value group (1 for FFNs). ``out_bias``: the output projection's bias, kept while any unit is.

    Selection budgets count weights only (``params``, ``kv_params``): the biases of the units a plan removes stay
    in its fixed cost, so a parameter budget's plan ends below the budget by those biases.
    """

    units: int
    group: int
    params: int
    bias: int
    macs: int
    kv_params: int = 0
    kv_bias: int = 0
    kv_macs: int = 0
    out_bias: int = 0

    def kept_params(self, n: int, n_kv: int) -> int:
        """Parameters of the block's projections with ``n`` units and ``n_kv`` key/value groups kept."""
        return n * (self.params + self.bias) + n_kv * (self.kv_params + self.kv_bias) + self.out_bias

    def kept_macs(self, n: int, n_kv: int) -> int:
        return n * self.macs + n_kv * self.kv_macs


def unit_costs(block: Block, seq_len: int, hidden: int | None = None) -> UnitCost:
    """Per-unit costs of ``block`` (a block that still has its projections: not an emptied one); ``hidden``: as if
    the model's hidden size (what the block reads and writes) were that."""
    if block.is_expert:
        return _expert_unit_costs(block, seq_len)
    o = block.output_projection()
    out_bias = _bias(o) if hidden is None or not _bias(o) else hidden
    if not block.is_attention:
        ups = block.input_projections()
        params = sum(in_features(u) if hidden is None else hidden for u in ups) + (
            out_features(o) if hidden is None else hidden)
        return UnitCost(units=block.units, group=1, params=params, bias=sum(1 for u in ups if _bias(u)),
                        macs=seq_len * params, out_bias=out_bias)
    heads, kv_heads, head_dim = block.dims()
    projs = block.input_projections()
    hidden_in = in_features(projs[0]) if hidden is None else hidden
    o_cols = head_dim * (out_features(o) if hidden is None else hidden)
    if block.spec.fused_qkv:  # every head carries its own k and v rows
        params, bias = 3 * hidden_in * head_dim + o_cols, 3 * head_dim if _bias(projs[0]) else 0
        kv_params, kv_bias = 0, 0
    else:
        params, bias = hidden_in * head_dim + o_cols, head_dim if _bias(projs[0]) else 0
        kv_params, kv_bias = 2 * hidden_in * head_dim, head_dim * sum(1 for p in projs[1:] if _bias(p))
    return UnitCost(units=heads, group=heads // kv_heads if kv_heads else 1, params=params, bias=bias,
                    macs=seq_len * params + 2 * head_dim * seq_len * seq_len, kv_params=kv_params, kv_bias=kv_bias,
                    kv_macs=seq_len * kv_params, out_bias=out_bias)


def _expert_unit_costs(block: Block, seq_len: int) -> UnitCost:
    """An expert: its router row and its matrices; MACs: its router row per token (top-k experts run per token
    however many there are). A neuron inside the experts: its gate, up and down weights; MACs: per token, the
    share of tokens routed to its expert (top-k / experts)."""
    router = get_module(block.layer, block.spec.router)
    experts, _, _ = block.dims()
    params = _numel(block.module()) // experts
    if block.kind == "experts":
        row = router.weight.shape[1]
        return UnitCost(units=experts, group=1, params=row + params, bias=_bias(router) // experts, macs=seq_len * row)
    hidden = router.weight.shape[1]
    macs = seq_len * 3 * hidden * router.top_k // experts
    return UnitCost(units=block.units, group=1, params=3 * hidden, bias=0, macs=macs)


def _moe_cost(block: Block, entry, seq_len: int) -> tuple:
    """(params now, params kept, MACs kept, kept experts) of a MoE layer's routed experts and their router, under
    the layer's plan ``entry`` (its ``experts`` and ``expert_ffn``)."""
    router = get_module(block.layer, block.spec.router)
    now = _numel(router) + _numel(block.module())
    experts, width = expert_dims(block.layer, block.spec)
    keep = entry and entry.get("experts")
    n = experts if keep is None else len(keep)
    per_expert = _numel(block.module()) // experts
    if entry is not None and entry.get("expert_ffn") is not None and width:
        counts = expert_neurons(entry, {"experts": (experts,), "expert_ffn": (experts * width,)})
        per_expert -= 3 * router.weight.shape[1] * (width - max(counts.values(), default=0))
    hidden = router.weight.shape[1]
    kept = n * (per_expert + hidden + _bias(router) // experts)
    return now, kept, seq_len * (n * hidden + router.top_k * per_expert), n


def _attention_cost(block: Block, keep, seq_len: int, hidden: int | None = None) -> tuple:
    """(params now, params kept, MACs kept, kept heads) of one attention block."""
    if block.is_empty():
        return _numel(block.module()), _numel(block.module()), 0, 0
    spec = block.spec
    o = block.output_projection()
    now = sum(_numel(p) for p in block.projections())
    if keep is not None and len(keep) == 0:
        # The whole module becomes an EmptyAttention (per-head norms and scales go too); only the output
        # projection's bias survives, inside it (``empty="bias"``) or on the outer projection ("context").
        inside = spec.o.startswith(spec.module + ".") if spec.module else True
        now = _numel(block.module()) + (0 if inside else _numel(o))
        return now, _bias(o) if hidden is None or not _bias(o) else hidden, 0, 0
    unit = unit_costs(block, seq_len, hidden)
    n = unit.units if keep is None else len(keep)
    n_kv = unit.units // unit.group if keep is None else len({h // unit.group for h in keep})
    return now, unit.kept_params(n, n_kv), unit.kept_macs(n, n_kv), n


def _ffn_cost(block: Block, keep, seq_len: int, hidden: int | None = None) -> tuple:
    """(params now, params kept, MACs kept, kept neurons) of one FFN block."""
    if block.is_empty():
        return _numel(block.module()), _numel(block.module()), 0, 0
    now = sum(_numel(p) for p in block.projections())
    if keep is not None and len(keep) == 0 and block.spec.module is not None:
        # The whole block becomes an EmptyFfn that keeps only the down projection's bias.
        bias = _bias(block.output_projection())
        return _numel(block.module()), bias if hidden is None or not bias else hidden, 0, 0
    unit = unit_costs(block, seq_len, hidden)
    n = unit.units if keep is None else len(keep)
    return now, unit.kept_params(n, 0), unit.kept_macs(n, 0), n


def estimate(model: nn.Module, plan=None, seq_len: int = 128) -> CostReport:
    """Cost of ``model`` as it is (``plan=None``) or as ``apply_plan(model, plan)`` would leave it."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    model = unwrap(model)
    spec = get_adapter(model).arch_spec(model.config)
    plan = as_plan(plan) if plan is not None else None
    planned = plan.stacks() if plan is not None else {}
    total = _numel(model)
    # a hidden keep-list: every parameter along the hidden size shrinks to the kept channels
    hidden, size, along = None, None, {}
    if plan is not None and plan.hidden is not None:
        hidden, size = len(plan.hidden), hidden_size(model, spec)
        along = {id(p): p for p, _ in hidden_parameters(model, spec)}
        in_layers = {id(p) for _, _, layer, _ in iter_layers(model, spec) for p in layer.parameters()}
        total -= sum(p.numel() // size * (size - hidden) for i, p in along.items() if i not in in_layers)
    layers = []
    for key, i, layer, stack in iter_layers(model, spec):
        entries = planned.get(key)
        entry = entries[i] if entries else None
        layer_params = _numel(layer)
        if entry is not None and entry.drop:
            total -= layer_params
            continue
        params, macs, heads, neurons = layer_params, 0, {}, {}
        costed = set()
        for block in layer_blocks(key, i, layer, stack):
            if block.is_expert:  # routed experts and their neurons are costed together, once
                if block.kind == "experts":
                    now, kept, m, units = _moe_cost(block, entry, seq_len)
                    neurons["experts"] = units
                    params, macs = params - now + kept, macs + m
                else:  # kept neurons inside all kept experts
                    experts, width = expert_dims(block.layer, block.spec)
                    dims = {"experts": (experts,), "expert_ffn": (experts * width,)}
                    neurons["expert_ffn"] = experts * width if entry is None else sum(
                        expert_neurons(entry, dims).values())
                continue
            cost = _attention_cost if block.is_attention else _ffn_cost
            now, kept, m, units = cost(block, entry and entry.get(block.key.name), seq_len, hidden)
            (heads if block.is_attention else neurons)[block.key.name] = units
            params, macs = params - now + kept, macs + m
            if hidden is not None and not block.is_empty():
                costed |= {id(p) for proj in block.projections() for p in proj.parameters()}
        if hidden is not None:  # the layer's norms, and emptied blocks' biases
            params -= sum(p.numel() // size * (size - hidden) for p in layer.parameters()
                          if id(p) in along and id(p) not in costed)
        total += params - layer_params
        layers.append(LayerCost(key, i, params, macs, heads, neurons))
    return CostReport(params=total, macs=sum(c.macs for c in layers), seq_len=seq_len, layers=tuple(layers))

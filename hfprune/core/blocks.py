# Copyright hfprune contributors. Apache-2.0.
"""The one walk over a model's prunable blocks.

Every part of hfprune that visits "each stack, each layer, each attention / FFN block" (costs, masks, scores,
recovery, latency tables, slicing plans) does it through :func:`iter_blocks`, so a new kind of prunable unit is
added here once. A :class:`Block` knows its units (query heads or neurons), the projections whose output rows
belong to them and the projection whose input columns do, and sees through Linear / Conv1D / peft LoRA wrappers.

Blocks come in forward order: stacks as the adapter lists them, layers in order, attention before FFN blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .arch import get_adapter
from .structure import (
    ArchSpec,
    AttentionSpec,
    EmptyAttention,
    EmptyFfn,
    ExpertsSpec,
    FfnSpec,
    StackSpec,
    attention_dims,
    base_layer,
    expert_dims,
    ffn_width,
    get_module,
    head_rows,
    is_conv1d,
)

HEADS = "heads"
FFN = "ffn"
EXPERTS = "experts"  # whole routed experts of a MoE layer
EXPERT_FFN = "expert_ffn"  # neurons inside them, unit e * I + j
EXPERT_KINDS = (EXPERTS, EXPERT_FFN)


class BlockKey(NamedTuple):
    """``(stack, layer index, block name)``, e.g. ``("layers", 3, "heads")``; equal to the plain tuple."""

    stack: str
    index: int
    name: str

    # printed as the plain tuple too, so error messages, logs and doctests read as they did before BlockKey
    __repr__ = tuple.__repr__


@dataclass(frozen=True)
class Block:
    """One attention or FFN block of one layer, as the model is now.

    ``kind`` is ``"heads"`` (units are query heads; key/value heads follow in GQA groups) or ``"ffn"`` (units are
    neurons). ``spec`` is the adapter's :class:`AttentionSpec` or :class:`FfnSpec`, ``stack_spec`` its stack.
    """

    key: BlockKey
    layer: nn.Module
    spec: AttentionSpec | FfnSpec
    stack_spec: StackSpec

    @property
    def kind(self) -> str:
        if isinstance(self.spec, ExpertsSpec):
            return self.key.name  # "experts" or "expert_ffn"
        return HEADS if isinstance(self.spec, AttentionSpec) else FFN

    @property
    def is_expert(self) -> bool:
        """A block of a MoE layer's routed experts (``experts``: whole experts; ``expert_ffn``: their neurons):
        no input or output projection, its weights are 3-D parameters and the router's rows."""
        return self.kind in EXPERT_KINDS

    @property
    def is_attention(self) -> bool:
        return self.kind == HEADS

    def dims(self) -> tuple[int, int, int]:
        """``(units, kv_units, unit_width)``: heads, key/value heads and head_dim, or neurons, neurons and 1."""
        if self.is_attention:
            return attention_dims(self.layer, self.spec)
        if self.is_expert:  # (experts, experts, 1) or (experts * neurons per expert, experts, 1)
            experts, width = expert_dims(self.layer, self.spec)
            return (experts if self.kind == EXPERTS else experts * width), experts, 1
        n = ffn_width(self.layer, self.spec)
        return n, n, 1

    def top_k(self) -> int:
        """Experts each token is routed to (a MoE block's router ``top_k``); 0 for other blocks."""
        if not self.is_expert:
            return 0
        return int(getattr(get_module(self.layer, self.spec.router), "top_k", 1))

    @property
    def units(self) -> int:
        return self.dims()[0]

    @property
    def width(self) -> int:
        """Input features of the output projection per unit: head_dim, or 1 for a neuron."""
        return self.dims()[2] if self.is_attention else 1

    def is_empty(self) -> bool:
        """Replaced by an :class:`EmptyAttention` / :class:`EmptyFfn` (no unit left, nothing to run)."""
        if self.is_expert or self.spec.module is None:
            return False
        return isinstance(get_module(self.layer, self.spec.module), (EmptyAttention, EmptyFfn))

    def module(self) -> nn.Module | None:
        """The attention module (or the FFN module, where the adapter names one; the experts module)."""
        if self.is_expert:
            return get_module(self.layer, self.spec.experts)
        return None if self.spec.module is None else get_module(self.layer, self.spec.module)

    def input_paths(self) -> list:
        """Paths (relative to the layer) of the projections whose output rows belong to units, in order."""
        if self.is_attention:
            return [self.spec.q] if self.spec.fused_qkv else [self.spec.q, self.spec.k, self.spec.v]
        return list(self.spec.up)

    def output_path(self) -> str:
        """Path of the projection whose input columns belong to units (attention output / FFN down)."""
        return self.spec.o if self.is_attention else self.spec.down

    def input_projections(self) -> list:
        return [get_module(self.layer, p) for p in self.input_paths()]

    def output_projection(self) -> nn.Module:
        return get_module(self.layer, self.output_path())

    def projections(self) -> list:
        """Every projection of the block, each once: the input projections, then the output projection."""
        return [*self.input_projections(), self.output_projection()]

    def unit_slices(self, idx: torch.Tensor) -> list:
        """``[(parameter, dim, indices)]``: every weight slice that belongs to units ``idx`` (sorted, on the CPU).

        Attention: the query rows of those heads (all three sections of a fused q/k/v), the key and value rows of
        the key/value groups *all* of whose query heads are in ``idx``, and the output projection's columns.
        FFN: the rows of every up (and gate) projection and the down projection's columns. LoRA adapters' rows
        (``lora_B``) and columns (``lora_A``) follow their base layer.
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device="cpu")
        if self.is_expert:
            return expert_slices(self.layer, self.spec, self.kind, idx)
        if not self.is_attention:
            out = [s for m in self.input_projections() for s in output_slices(m, idx)]
            return out + input_slices(self.output_projection(), idx)
        heads, kv_heads, head_dim = self.dims()
        rows = head_rows(idx, head_dim)
        q = get_module(self.layer, self.spec.q)
        if self.spec.fused_qkv:
            inner = heads * head_dim
            out = output_slices(q, torch.cat([rows, rows + inner, rows + 2 * inner]))  # [q | k | v] sections
        else:
            out = output_slices(q, rows)
            group = heads // kv_heads
            removed = torch.zeros(heads, dtype=torch.bool)
            removed[idx] = True
            dead_kv = torch.nonzero(removed.reshape(kv_heads, group).all(1)).flatten()
            if len(dead_kv):
                kv_rows = head_rows(dead_kv, head_dim)
                out += output_slices(get_module(self.layer, self.spec.k), kv_rows)
                out += output_slices(get_module(self.layer, self.spec.v), kv_rows)
        return out + input_slices(self.output_projection(), rows)


def iter_stacks(model: nn.Module, spec: ArchSpec | None = None) -> Iterator[tuple]:
    """``(stack key, StackSpec, its layers' ModuleList)`` for every stack, in forward order."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    for key, stack in spec.stacks.items():
        yield key, stack, get_module(model.base_model, stack.layers)


def iter_layers(model: nn.Module, spec: ArchSpec | None = None) -> Iterator[tuple]:
    """``(stack key, layer index, layer module, StackSpec)`` for every layer of every stack, in forward order."""
    for key, stack, layers in iter_stacks(model, spec):
        for i, layer in enumerate(layers):
            yield key, i, layer, stack


def layer_blocks(key: str, index: int, layer: nn.Module, stack: StackSpec, kind: str | None = None) -> Iterator[Block]:
    """The blocks of one layer, given as :func:`iter_layers` yields it (attention first); ``kind`` keeps one kind.
    For walks that also need the layer itself (costs, layer hooks)."""
    for name, attn in stack.attention.items():
        if kind in (None, HEADS):
            yield Block(BlockKey(key, index, name), layer, attn, stack)
    for name, ffn in stack.ffn.items():
        if kind in (None, FFN):
            yield Block(BlockKey(key, index, name), layer, ffn, stack)
    moe = stack.experts
    if moe is not None:
        for name in (EXPERTS, EXPERT_FFN) if moe.layout == "gate_up" else (EXPERTS,):
            if kind in (None, name):
                yield Block(BlockKey(key, index, name), layer, moe, stack)


def iter_blocks(model: nn.Module, spec: ArchSpec | None = None, kind: str | None = None) -> Iterator[Block]:
    """Every prunable block of ``model`` (a transformers model, already unwrapped), in forward order; ``kind``
    (``"heads"`` / ``"ffn"``) keeps one kind."""
    for row in iter_layers(model, spec):
        yield from layer_blocks(*row, kind=kind)


def get_block(model: nn.Module, key: tuple, spec: ArchSpec | None = None) -> Block:
    """The block at ``(stack, layer index, name)``."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    stack_key, i, name = key
    stack = spec.stacks[stack_key]
    layer = get_module(model.base_model, stack.layers)[i]
    for block in layer_blocks(stack_key, i, layer, stack):
        if block.key.name == name:
            return block
    names = sorted(b.key.name for b in layer_blocks(stack_key, i, layer, stack))
    raise KeyError(f"{stack_key}[{i}] has no block {name!r}; it has {names}")


def expert_slices(layer: nn.Module, spec: ExpertsSpec, kind: str, idx: torch.Tensor) -> list:
    """``[(tensor, dim, indices)]`` of experts ``idx`` (router rows, every expert parameter's dim 0) or of expert
    neurons ``idx`` (flat ``e * I + j``: per expert, its gate and up rows and its down column; the tensors are
    views of one expert's matrices, so zeroing them zeroes the parameter)."""
    router, experts = get_module(layer, spec.router), get_module(layer, spec.experts)
    if kind == EXPERTS:
        params = [*router.parameters(recurse=False), *experts.parameters(recurse=False)]
        return [(p, 0, idx) for p in params]
    _, width = expert_dims(layer, spec)
    out = []
    for e in torch.unique(idx // width).tolist():
        cols = idx[idx // width == e] % width
        out.append((experts.gate_up_proj[e], 0, torch.cat([cols, cols + width])))  # (2I, H): [gate; up] rows
        out.append((experts.down_proj[e], 1, cols))  # (H, I)
    return out


# ---- weight views through Linear / Conv1D / LoRA wrappers --------------------------------------------------------


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whatever its storage (a view: Conv1D's is transposed)."""
    base = base_layer(module)
    return base.weight.T if is_conv1d(base) else base.weight


def merged_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight including an unmerged LoRA update, as the forward pass applies it (an adapter already
    merged into the base weight is in it once). The base weight is detached."""
    w = weight_out_in(module).detach()
    if base_layer(module) is module or not getattr(module, "active_adapters", None):
        return w
    merged = set(getattr(module, "merged_adapters", None) or ())
    for name in module.active_adapters:
        if name in module.lora_A and name not in merged:
            delta = module.lora_B[name].weight @ module.lora_A[name].weight
            w = w + module.scaling[name] * delta.to(w.dtype)
    return w


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The base layer's bias, detached, or ``None``."""
    b = getattr(base_layer(module), "bias", None)
    return None if b is None else b.detach()


def output_slices(module: nn.Module, rows: torch.Tensor) -> list:
    """``[(parameter, dim, rows)]`` of output features ``rows``: base weight and bias, and LoRA B."""
    base = base_layer(module)
    out = [(base.weight, 1 if is_conv1d(base) else 0, rows)]
    if getattr(base, "bias", None) is not None:
        out.append((base.bias, 0, rows))
    if base is not module:
        out += [(b.weight, 0, rows) for b in module.lora_B.values()]
    return out


def input_slices(module: nn.Module, cols: torch.Tensor) -> list:
    """``[(parameter, dim, cols)]`` of input features ``cols``: base weight and LoRA A."""
    base = base_layer(module)
    out = [(base.weight, 0 if is_conv1d(base) else 1, cols)]
    if base is not module:
        out += [(a.weight, 1, cols) for a in module.lora_A.values()]
    return out

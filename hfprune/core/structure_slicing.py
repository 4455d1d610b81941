# Copyright hfprune contributors. Apache-2.0.
"""Part of the structure engine (see :mod:`hfprune.core.structure`): slice attention heads, FFN neurons, experts,
layers and hidden channels to a plan in its JSON form. Copied into heterogeneous checkpoints under the same name."""

from __future__ import annotations

import math

import torch
from torch import nn

from .structure_modules import (
    EmptyAttention,
    EmptyFfn,
    base_layer,
    get_module,
    head_rows,
    out_features,
    replace_param,
    set_features,
    set_module,
    slice_input,
    slice_output,
    slice_param,
    zero_input_output,
)
from .structure_specs import ArchSpec, AttentionSpec, ExpertsSpec, FfnSpec, StackSpec

# Blocks


def attention_dims(layer: nn.Module, spec: AttentionSpec) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of one attention block as it is now."""
    module = get_module(layer, spec.module)
    if isinstance(module, EmptyAttention):
        return 0, 0, module.head_dim
    head_dim = int(getattr(module, spec.head_dim_attr))
    if spec.fused_qkv:
        inner = out_features(get_module(layer, spec.q)) // 3
        return inner // head_dim, inner // head_dim, head_dim
    q = out_features(get_module(layer, spec.q)) // head_dim
    kv = out_features(get_module(layer, spec.k)) // head_dim
    return q, kv, head_dim


def prune_attention(layer: nn.Module, spec: AttentionSpec, keep_heads: list, layer_idx: int | None) -> None:
    """Keep query heads ``keep_heads`` (sorted); key/value groups with no kept query head go too."""
    if isinstance(get_module(layer, spec.module), EmptyAttention):
        return  # no head left to remove (a plan can only keep [] of zero heads): pruning a pruned model again
    heads, kv_heads, head_dim = attention_dims(layer, spec)
    # Explicit CPU: from_pretrained builds under a meta-device context, where index math cannot run.
    keep = torch.as_tensor(sorted(keep_heads), dtype=torch.long, device="cpu")
    module = get_module(layer, spec.module)
    if len(keep) == 0:
        o = get_module(layer, spec.o)
        if spec.empty == "context":
            slice_input(o, keep)
        bias = zero_input_output(o) if spec.empty == "bias" else None
        empty = EmptyAttention(spec.empty, out_features(o), bias, spec.returns, head_dim, layer_idx, spec.cache)
        set_module(layer, spec.module, empty.to(base_layer(o).weight.device))
        return
    group = heads // kv_heads
    keep_kv = torch.unique(keep // group)  # sorted
    rows = head_rows(keep, head_dim)
    if spec.fused_qkv:
        inner = heads * head_dim
        fused = torch.cat([rows, rows + inner, rows + 2 * inner])  # [q | k | v] sections
        slice_output(get_module(layer, spec.q), fused)
    else:
        kv_rows = head_rows(keep_kv, head_dim)
        slice_output(get_module(layer, spec.q), rows)
        slice_output(get_module(layer, spec.k), kv_rows)
        slice_output(get_module(layer, spec.v), kv_rows)
    slice_input(get_module(layer, spec.o), rows)
    n, n_kv = len(keep), len(keep_kv)
    values = {"heads": n, "kv_heads": n_kv, "head_dim": head_dim, "inner": n * head_dim,
              "kv_inner": n_kv * head_dim, "groups": n // n_kv}
    for attr, quantity in spec.attrs.items():
        setattr(module, attr, values[quantity])


def ffn_width(layer: nn.Module, spec: FfnSpec) -> int:
    """Neurons of one FFN block as it is now."""
    if spec.module is not None and isinstance(get_module(layer, spec.module), EmptyFfn):
        return 0
    return out_features(get_module(layer, spec.up[0]))


def prune_ffn(layer: nn.Module, spec: FfnSpec, keep_neurons: list) -> None:
    if spec.module is not None and isinstance(get_module(layer, spec.module), EmptyFfn):
        return  # no neuron left to remove, as for an EmptyAttention
    keep = torch.as_tensor(sorted(keep_neurons), dtype=torch.long, device="cpu")
    down = get_module(layer, spec.down)
    if len(keep) == 0 and spec.module is not None:
        empty = EmptyFfn(out_features(down), zero_input_output(down))
        set_module(layer, spec.module, empty.to(base_layer(down).weight.device))
        return
    for path in spec.up:
        slice_output(get_module(layer, path), keep)
    slice_input(down, keep)


def expert_dims(layer: nn.Module, spec: ExpertsSpec) -> tuple[int, int]:
    """(experts, neurons per expert) of one MoE layer as it is now."""
    experts = get_module(layer, spec.experts)
    width = experts.down_proj.shape[-1] if spec.layout == "gate_up" else 0
    return get_module(layer, spec.router).weight.shape[0], width


def prune_experts(layer: nn.Module, spec: ExpertsSpec, keep_experts: list | None, keep_neurons: list | None) -> None:
    """Keep experts ``keep_experts`` and, in them, the neurons ``keep_neurons`` (flat ``e * I + j``, the same
    number per kept expert), both indices of the layer as it is."""
    router, experts = get_module(layer, spec.router), get_module(layer, spec.experts)
    n_experts, width = expert_dims(layer, spec)
    kept = list(range(n_experts)) if keep_experts is None else sorted(keep_experts)
    if keep_experts is not None:
        keep = torch.as_tensor(kept, dtype=torch.long, device="cpu")
        for owner in (router, experts):  # every parameter is one row (or matrix) per expert
            for name in [n for n, _ in owner.named_parameters(recurse=False)]:
                slice_param(owner, name, 0, keep)
            if hasattr(owner, "num_experts"):
                owner.num_experts = len(kept)
    if keep_neurons is None:
        return
    per_expert: dict = {}
    for k in sorted(keep_neurons):
        per_expert.setdefault(k // width, []).append(k % width)
    rows = torch.as_tensor([per_expert.get(e, []) for e in kept], dtype=torch.long, device="cpu")  # (E', n)
    rows = rows.reshape(len(kept), -1)
    with torch.no_grad():
        gate_up, down = experts.gate_up_proj, experts.down_proj  # (E', 2I, H), (E', H, I)
        both = torch.cat([rows, rows + width], dim=1).to(gate_up.device)  # [gate; up] rows
        replace_param(experts, "gate_up_proj", gate_up.gather(1, both[:, :, None].expand(-1, -1, gate_up.shape[2])))
        cols = rows.to(down.device)[:, None, :].expand(-1, down.shape[1], -1)
        replace_param(experts, "down_proj", down.gather(2, cols))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = rows.shape[1]


def drop_layers(base: nn.Module, config, stack: StackSpec, drop: list) -> None:
    """Delete layers ``drop`` from a stack; layer counts, per-layer config lists and ``layer_idx`` follow."""
    layers = get_module(base, stack.layers)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    set_module(base, stack.layers, nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    if stack.num_layers_field:
        setattr(config, stack.num_layers_field, len(kept))
    for name in stack.per_layer_fields:
        values = getattr(config, name, None)
        if values is not None:
            setattr(config, name, [v for i, v in enumerate(values) if i not in set(drop)])


def apply_structure(base: nn.Module, config, spec: ArchSpec, plan: dict) -> None:
    """Slice ``base`` (the model's base model) in place to ``plan`` in its JSON form."""
    for key, stack in spec.stacks.items():
        entries = plan.get(key) or []
        layers = get_module(base, stack.layers)
        for i, entry in enumerate(entries):
            if entry.get("drop"):
                continue
            for name, attn in stack.attention.items():
                if entry.get(name) is not None:
                    prune_attention(layers[i], attn, entry[name], _layer_idx(layers[i], attn))
            for name, ffn in stack.ffn.items():
                if entry.get(name) is not None:
                    prune_ffn(layers[i], ffn, entry[name])
            if stack.experts is not None and (entry.get("experts") is not None or entry.get("expert_ffn") is not None):
                prune_experts(layers[i], stack.experts, entry.get("experts"), entry.get("expert_ffn"))
        drop = [i for i, entry in enumerate(entries) if entry.get("drop")]
        if drop:
            drop_layers(base, config, stack, drop)


def _layer_idx(layer: nn.Module, spec: AttentionSpec) -> int | None:
    return getattr(get_module(layer, spec.module), "layer_idx", None)


def hidden_sites(model: nn.Module, spec: ArchSpec) -> dict:
    """The modules of ``model`` (a transformers model of a family with ``spec.hidden``) that hold hidden channels:
    lists ``embeddings``, ``norms``, ``readers`` (input columns), ``writers`` (output rows), ``empty`` (emptied
    blocks whose bias is added to the stream) and ``heads`` (head readers; ``None``: the class is not listed)."""
    h = spec.hidden
    base = model.base_model
    stack = spec.stacks[h.stack]
    sites = {"embeddings": [get_module(base, p) for p in h.embeddings], "norms": [get_module(base, p) for p in h.norms],
             "readers": [m for p in h.readers if (m := _optional_module(base, p)) is not None], "writers": [],
             "empty": []}
    for layer in get_module(base, stack.layers):
        sites["norms"] += [get_module(layer, p) for p in h.layer_norms]
        for attn in stack.attention.values():
            if isinstance(get_module(layer, attn.module), EmptyAttention):
                sites["empty"].append(get_module(layer, attn.module))
                if attn.empty == "context":  # the outer output projection (no input column left) adds its bias
                    sites["writers"].append(get_module(layer, attn.o))
                continue
            sites["readers"] += [get_module(layer, p) for p in dict.fromkeys((attn.q, attn.k, attn.v))]
            sites["writers"].append(get_module(layer, attn.o))
        for ffn in stack.ffn.values():
            if ffn.module is not None and isinstance(get_module(layer, ffn.module), EmptyFfn):
                sites["empty"].append(get_module(layer, ffn.module))
                continue
            sites["readers"] += [get_module(layer, p) for p in ffn.up]
            sites["writers"].append(get_module(layer, ffn.down))
    heads = h.heads.get(type(model).__name__)
    sites["heads"] = None if heads is None else [get_module(model, p) for p in heads]
    return sites


def _optional_module(root: nn.Module, path: str) -> nn.Module | None:
    parent, _, name = path.rpartition(".")
    try:
        return getattr(get_module(root, parent), name, None)
    except AttributeError:
        return None


def prune_hidden(model: nn.Module, spec: ArchSpec, keep_channels: list) -> None:
    """Keep hidden channels ``keep_channels`` (sorted) of ``model`` everywhere the residual stream goes; a head
    tied to the input embeddings stays tied. RMSNorms are folded (see :class:`HiddenSpec`)."""
    sites = hidden_sites(model, spec)
    keep = torch.as_tensor(sorted(keep_channels), dtype=torch.long, device="cpu")
    first = sites["embeddings"][0]
    size, k = first.weight.shape[1], len(keep)
    tied = [m for m in sites["heads"] or () if base_layer(m).weight is first.weight]
    for m in sites["embeddings"]:
        slice_param(m, "weight", 1, keep)
        m.embedding_dim = k
    for m in sites["norms"]:
        slice_param(m, "weight", 0, keep)
        slice_param(m, "bias", 0, keep)
        if hasattr(m, "normalized_shape"):
            m.normalized_shape = (k,)
        if spec.hidden.rms:  # mean over H channels, k alive = (k / H) * mean over the k
            with torch.no_grad():
                replace_param(m, "weight", m.weight * math.sqrt(size / k))
            if spec.hidden.eps_attr is not None:
                setattr(m, spec.hidden.eps_attr, getattr(m, spec.hidden.eps_attr) * size / k)
    for m in sites["readers"] + [m for m in sites["heads"] or () if m not in tied]:
        slice_input(m, keep)
    for m in sites["writers"]:
        slice_output(m, keep)
    for m in sites["empty"]:
        if m.bias is not None and m.bias.shape[0] == size:
            slice_param(m, "bias", 0, keep)
        if getattr(m, "kind", "bias") != "context":
            m.out_features = k
    for m in tied:
        base_layer(m).weight = first.weight
        set_features(base_layer(m), inp=k)


def without_dropped(plan: dict) -> dict:
    """The plan as seen by a checkpoint whose dropped layers are already gone."""
    # Only the stacks (lists of layer objects) lose entries; other keys (``dense``, ``base_model``, keys a newer
    # hfprune may add) describe the plan and pass through untouched.
    return {k: [e for e in v if not (isinstance(e, dict) and e.get("drop"))] if isinstance(v, list) else v
            for k, v in plan.items()}


# ----------------------------------------------------------------------------------------------

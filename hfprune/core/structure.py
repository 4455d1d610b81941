# Copyright hfprune contributors. Apache-2.0.
"""The structure engine: slices a transformers model to a prune plan.

This file imports only ``torch`` and ``transformers`` on purpose. It is copied verbatim into every
heterogeneous pruned checkpoint as its modeling code, so ``from_pretrained(dir, trust_remote_code=True)``
rebuilds the pruned shapes with exactly the code that produced them, in a process without hfprune.

The architecture knowledge comes in as data (:class:`ArchSpec`, stored in the checkpoint's config as JSON)
and the plan in its JSON form (``{"layers": [{"heads": [...], "ffn": [...], "drop": bool}, ...]}``).
Validation of plans happens before this code runs (``hfprune.core.plan``); this module trusts its input.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

# Quantities an attention module's attributes may be synced to after slicing.
QUANTITIES = ("heads", "kv_heads", "head_dim", "inner", "kv_inner", "groups")


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention block lives inside a layer, and how to keep it consistent after slicing.

    Paths are relative to the layer module. ``module`` is the attention module whose attributes are
    synced (``attrs``: attribute name -> one of :data:`QUANTITIES`) and which is replaced by an
    :class:`EmptyAttention` when no head remains (its ``-1`` head reshape cannot run at zero width).
    ``empty`` says what that replacement returns: ``"bias"`` when ``module`` contains the output
    projection (it returns that projection's bias, exactly what the fully masked block adds to the
    residual), ``"context"`` when the output projection sits outside ``module`` (it returns a zero-width
    context that the outer projection, sliced to zero input columns, maps to its bias).

    Two flags tell masking (``hfprune.core.masking``) what a gate on the output projection's input cannot express;
    slicing ignores them. ``gate_query``: the module averages query-key scores over all heads (Autoformer's
    autocorrelation picks its delays from that mean), so gates also scale the query rows, renormalised to a
    mean over the kept heads. ``draws_rng``: the module draws from the global RNG in forward (Informer's
    ProbSparse key sample); a fully masked one must draw nothing, like the :class:`EmptyAttention` that
    replaces it, so later draws stay aligned.
    """

    q: str
    k: str
    v: str
    o: str
    module: str
    head_dim_attr: str = "head_dim"
    attrs: dict = field(default_factory=dict)
    empty: str = "bias"
    returns: int = 2
    cache: bool = False
    fused_qkv: bool = False
    gate_query: bool = False
    draws_rng: bool = False


@dataclass(frozen=True)
class FfnSpec:
    """An FFN block: ``up`` projections (up and gate) lose output rows, ``down`` loses input columns.

    ``module`` names a block to replace by a bias-only :class:`EmptyFfn` at zero width, for modules that
    cannot run zero-width (GPT-2's ``Conv1D``); ``None`` keeps zero-width linears, which torch runs.
    """

    up: tuple
    down: str
    module: str | None = None


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts of a mixture-of-experts layer (transformers 5 keeps them as 3-D parameters, expert first).

    Plan blocks: ``experts`` keeps whole experts (the ``router``'s weight/bias rows and dim 0 of every parameter of
    the ``experts`` module); ``expert_ffn`` keeps neurons inside them, unit ``e * I + j`` being neuron ``j`` of
    expert ``e``, the same number in every kept expert. Only ``layout="gate_up"`` (``gate_up_proj`` (E, 2I, H) as
    [gate; up], ``down_proj`` (E, H, I)) prunes neurons. For masking, the router's routing from its logits:
    ``softmax`` ``"all"`` (over all experts, then top-k) or ``"top_k"`` (over the top-k logits); ``renormalize``
    (the top-k weights to sum 1): a bool, or the router attribute holding it (``norm_topk_prob``).
    """

    router: str
    experts: str
    layout: str | None = "gate_up"
    softmax: str = "all"
    renormalize: bool | str = True


@dataclass(frozen=True)
class StackSpec:
    """A stack of layers (``layers`` path relative to the base model) and its prunable blocks."""

    layers: str
    attention: dict = field(default_factory=dict)
    ffn: dict = field(default_factory=dict)
    num_layers_field: str | None = None
    per_layer_fields: tuple = ()
    droppable: bool = True
    experts: ExpertsSpec | None = None


@dataclass(frozen=True)
class HiddenSpec:
    """Where the residual stream's channels (the hidden size) live, for a plan's ``hidden`` keep-list.

    ``embeddings`` (columns) and ``norms`` (weight and bias) are paths relative to the base model; ``layer_norms``
    relative to each layer of stack ``stack``, whose attention and FFN specs name the projections that read the
    stream (q/k/v, up: input columns) and write it (o, down: output rows). ``readers``: base-model projections
    that read it (BERT's pooler). ``heads``: per model class name, the head projections (paths relative to that
    model) that read it; a class not listed cannot be pruned in hidden size. ``rms``: RMSNorms, whose statistics
    over ``k`` of ``H`` channels are folded (weights times sqrt(H/k), ``eps_attr`` times H/k) so that the sliced
    model equals the dense one with the removed channels zeroed.
    """

    stack: str = "layers"
    embeddings: tuple = ()
    norms: tuple = ()
    layer_norms: tuple = ()
    readers: tuple = ()
    heads: dict = field(default_factory=dict)
    rms: bool = False
    eps_attr: str = "eps"


@dataclass(frozen=True)
class ArchSpec:
    """Everything the engine needs to know about one model family. Plan keys name the stacks."""

    model_type: str
    stacks: dict
    hidden: HiddenSpec | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for stack in out["stacks"].values():
            if stack.get("experts") is None:
                stack.pop("experts", None)  # records without experts stay as earlier versions wrote them
        if self.hidden is None:
            del out["hidden"]  # records of families without it stay as earlier versions wrote them
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ArchSpec:
        if d.get("hidden") is not None:
            h = d["hidden"]
            hidden = HiddenSpec(**{**h, **{k: tuple(h.get(k, ())) for k in ("embeddings", "norms", "layer_norms",
                                                                              "readers")},
                                   "heads": {c: tuple(p) for c, p in h.get("heads", {}).items()}})
            return replace(cls.from_dict({k: v for k, v in d.items() if k != "hidden"}), hidden=hidden)
        stacks = {}
        for key, s in d["stacks"].items():
            attention = {name: AttentionSpec(**a) for name, a in s["attention"].items()}
            ffn = {name: FfnSpec(**{**f, "up": tuple(f["up"])}) for name, f in s["ffn"].items()}
            rest = {k: v for k, v in s.items() if k not in ("attention", "ffn")}
            rest["per_layer_fields"] = tuple(rest.get("per_layer_fields", ()))
            if rest.get("experts") is not None:
                rest["experts"] = ExpertsSpec(**rest["experts"])
            stacks[key] = StackSpec(attention=attention, ffn=ffn, **rest)
        return cls(model_type=d["model_type"], stacks=stacks)


class _AnyCopy(type(nn.Module)):
    """``isinstance`` also accepts these classes from another copy of this file: a model loaded with
    ``trust_remote_code`` holds the ones its checkpoint's ``modeling_hfprune.py`` defines, and pruning or measuring
    it again (here, or in that copy) must recognise them."""

    def __instancecheck__(cls, obj) -> bool:
        # this file is hfprune.core.structure, or a checkpoint's modeling_hfprune
        # (transformers_modules.<id>.modeling_...)
        return any(c.__name__ == cls.__name__ and c.__module__.rpartition(".")[2] in ("structure", "modeling_hfprune")
                   for c in type(obj).__mro__)


class EmptyAttention(nn.Module, metaclass=_AnyCopy):
    """Stands in for an attention module that has lost every head.

    Returns what the fully masked module returns: the output projection's bias (or zeros), or a
    zero-width context. With ``cache=True`` it still appends zero-head key/value states to a KV cache,
    so the cache's sequence-length bookkeeping (read from layer 0 by generation) stays right.
    """

    def __init__(self, kind: str, out_features: int, bias: torch.Tensor | None, returns: int,
                 head_dim: int, layer_idx: int | None = None, cache: bool = False):
        super().__init__()
        self.kind = kind
        self.out_features = out_features
        self.returns = returns
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.cache = cache
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        lead = hidden.shape[:-1]
        if self.kind == "context":
            out = hidden.new_zeros(*lead, 0)
        elif self.bias is not None:
            out = self.bias.to(hidden.dtype).expand(*lead, self.out_features)
        else:
            out = hidden.new_zeros(*lead, self.out_features)
        cache = kwargs.get("past_key_values")
        if self.cache and cache is not None and self.layer_idx is not None:
            empty = hidden.new_zeros(lead[0], 0, lead[1], self.head_dim)  # (B, 0 heads, T, hd)
            cache.update(empty, empty, self.layer_idx)
        if self.returns == 1:
            return out
        return (out,) + (None,) * (self.returns - 1)


class EmptyFfn(nn.Module, metaclass=_AnyCopy):
    """Stands in for an FFN with no neuron left: adds only its down projection's bias."""

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden, *args, **kwargs):
        if self.bias is None:
            return hidden.new_zeros(*hidden.shape[:-1], self.out_features)
        return self.bias.to(hidden.dtype).expand(*hidden.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------------------------
# Module access


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D stores its weight as (in, out); matched by name to keep this file standalone.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def base_layer(module: nn.Module) -> nn.Module:
    # peft LoRA/DoRA wrappers keep the wrapped layer in `.base_layer` (duck-typed: no peft import here).
    return module.base_layer if hasattr(module, "base_layer") and hasattr(module, "lora_A") else module


def out_features(module: nn.Module) -> int:
    base = base_layer(module)
    return base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]


def in_features(module: nn.Module) -> int:
    base = base_layer(module)
    return base.weight.shape[0] if is_conv1d(base) else base.weight.shape[1]


# ----------------------------------------------------------------------------------------------
# Slicing primitives. Keep-indices are sorted LongTensors; dtype, device and requires_grad survive.


def _replace_param(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _slice_param(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    param = getattr(owner, name, None)
    if param is None:
        return
    with torch.no_grad():
        _replace_param(owner, name, param.index_select(dim, keep.to(param.device)))


def slice_output(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features ``keep`` of a Linear / Conv1D / LoRA-wrapped linear."""
    base = base_layer(module)
    _slice_param(base, "weight", 1 if is_conv1d(base) else 0, keep)
    _slice_param(base, "bias", 0, keep)
    _set_features(base, out=len(keep))
    if base is not module:
        for lora_b in module.lora_B.values():  # (out, r)
            _slice_param(lora_b, "weight", 0, keep)
            _slice_param(lora_b, "bias", 0, keep)  # peft's lora_bias=True
            _set_features(lora_b, out=len(keep))
        for mag in getattr(module, "lora_magnitude_vector", {}).values():  # DoRA: one magnitude per output row
            _slice_param(mag, "weight", 0, keep)
        _set_features(module, out=len(keep))
        _clear_dora_caches(module)


def slice_input(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` of a Linear / Conv1D / LoRA-wrapped linear."""
    base = base_layer(module)
    if base is not module:
        _rescale_dora_magnitude(module, keep)
    _slice_param(base, "weight", 0 if is_conv1d(base) else 1, keep)
    _set_features(base, inp=len(keep))
    if base is not module:
        for lora_a in module.lora_A.values():  # (r, in)
            _slice_param(lora_a, "weight", 1, keep)
            _set_features(lora_a, inp=len(keep))
        _set_features(module, inp=len(keep))
        _clear_dora_caches(module)
        if len(keep) == 0:
            _dora_to_lora(module)


def _rescale_dora_magnitude(module: nn.Module, keep: torch.Tensor) -> None:
    # DoRA scales each output row by magnitude / ||W + s*B@A||_row. Removing input columns shrinks that
    # norm, so the magnitude shrinks by the same ratio and the kept columns compute exactly as before.
    mags = getattr(module, "lora_magnitude_vector", None)
    if not mags:
        return
    base = base_layer(module)
    with torch.no_grad():
        for name, mag in mags.items():
            weight = base.weight.T if is_conv1d(base) else base.weight  # (out, in)
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            full = weight + module.scaling[name] * (b @ a)
            kept = full.index_select(1, keep.to(full.device))
            ratio = kept.norm(dim=1) / full.norm(dim=1).clamp_min(torch.finfo(full.dtype).tiny)
            _replace_param(mag, "weight", mag.weight * ratio.to(mag.weight.dtype))


def _clear_dora_caches(module: nn.Module) -> None:
    # DoRA may cache the weight norm and B@A (peft's ENABLE_DORA_CACHING); both have the old shapes now.
    for mag in getattr(module, "lora_magnitude_vector", {}).values():
        if callable(getattr(mag, "_cache_clear", None)):
            mag._cache_clear()


def _dora_to_lora(module: nn.Module) -> None:
    # With no input column left, ||W + s*B@A||_row is 0 and DoRA's magnitude / norm is NaN (forward and merge).
    # The layer now outputs exactly its bias, as the masked layer does (its magnitude gets no gradient there
    # either, the masked input being 0), so its DoRA adapters become plain LoRA: same output, finite, mergeable.
    mags = getattr(module, "lora_magnitude_vector", None)
    for name in list(mags or ()):
        del mags[name]
        getattr(module, "lora_variant", {}).pop(name, None)
        if name in getattr(module, "use_dora", {}):
            module.use_dora[name] = False


def zero_input_output(module: nn.Module) -> torch.Tensor | None:
    """What a projection outputs for a zero input: its bias, plus ``scaling * lora_B.bias`` of each active,
    unmerged plain-LoRA adapter made with peft's ``lora_bias=True`` (B@A and DoRA's terms vanish at zero)."""
    base = base_layer(module)
    bias = base.bias
    if base is module or getattr(module, "disable_adapters", False):
        return bias
    skip = set(getattr(module, "merged_adapters", ())) | set(getattr(module, "lora_variant", ()))
    extra = [module.scaling[name] * module.lora_B[name].bias
             for name in getattr(module, "active_adapters", module.lora_B.keys())
             if name in module.lora_B and name not in skip and getattr(module.lora_B[name], "bias", None) is not None]
    if not extra:
        return bias
    with torch.no_grad():
        total = sum(extra) if bias is None else bias + sum(extra)
    return total.requires_grad_(bias is not None and bias.requires_grad)  # trainable only where the base bias is


def _set_features(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    if is_conv1d(module):
        if out is not None:
            module.nf = out
        return
    if out is not None and hasattr(module, "out_features"):
        module.out_features = out
    if inp is not None and hasattr(module, "in_features"):
        module.in_features = inp


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads * head_dim) projection."""
    # (H, 1) * hd + (1, hd) -> (H, hd) -> (H * hd)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device="cpu")[None, :]).reshape(-1)


# ----------------------------------------------------------------------------------------------
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
                _slice_param(owner, name, 0, keep)
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
        _replace_param(experts, "gate_up_proj", gate_up.gather(1, both[:, :, None].expand(-1, -1, gate_up.shape[2])))
        cols = rows.to(down.device)[:, None, :].expand(-1, down.shape[1], -1)
        _replace_param(experts, "down_proj", down.gather(2, cols))
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
        _slice_param(m, "weight", 1, keep)
        m.embedding_dim = k
    for m in sites["norms"]:
        _slice_param(m, "weight", 0, keep)
        _slice_param(m, "bias", 0, keep)
        if hasattr(m, "normalized_shape"):
            m.normalized_shape = (k,)
        if spec.hidden.rms:  # mean over H channels, k alive = (k / H) * mean over the k
            with torch.no_grad():
                _replace_param(m, "weight", m.weight * math.sqrt(size / k))
            if spec.hidden.eps_attr is not None:
                setattr(m, spec.hidden.eps_attr, getattr(m, spec.hidden.eps_attr) * size / k)
    for m in sites["readers"] + [m for m in sites["heads"] or () if m not in tied]:
        slice_input(m, keep)
    for m in sites["writers"]:
        slice_output(m, keep)
    for m in sites["empty"]:
        if m.bias is not None and m.bias.shape[0] == size:
            _slice_param(m, "bias", 0, keep)
        if getattr(m, "kind", "bias") != "context":
            m.out_features = k
    for m in tied:
        base_layer(m).weight = first.weight
        _set_features(base_layer(m), inp=k)


def without_dropped(plan: dict) -> dict:
    """The plan as seen by a checkpoint whose dropped layers are already gone."""
    # Only the stacks (lists of layer objects) lose entries; other keys (``dense``, ``base_model``, keys a newer
    # hfprune may add) describe the plan and pass through untouched.
    return {k: [e for e in v if not (isinstance(e, dict) and e.get("drop"))] if isinstance(v, list) else v
            for k, v in plan.items()}


# ----------------------------------------------------------------------------------------------
# Reloading: the generated modeling file subclasses the original transformers class with this mixin.

HFPRUNE_CONFIG_KEY = "hfprune"
MODELING_FILE = "modeling_hfprune.py"  # this file's name in a checkpoint
PLAN_FILE = "prune_plan.json"
# The hfprune version that wrote this code: a checkpoint's modeling_hfprune.py sets it below this file's text, and
# prune_plan.json records it.
HFPRUNE_VERSION: str | None = None
# Arguments of ``save_pretrained(..., push_to_hub=True)`` that say where and how to push, not what to save.
HUB_ARGUMENTS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr",
                 "tags")


class PrunedModelMixin:
    """Rebuilds the pruned shapes right after the stock ``__init__``; loading then fills the weights.

    A checkpoint's ``modeling_hfprune.py`` defines ``class X(PrunedModelMixin, transformers.X)``: the class keeps
    the stock class's name, because transformers identifies models by class name (``pipeline(...)`` checks it
    against the task's supported models, and ``save_pretrained`` writes it into ``architectures``).
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = getattr(config, HFPRUNE_CONFIG_KEY, None)
        if not record:
            raise ValueError(
                f"{type(self).__name__} needs `config.{HFPRUNE_CONFIG_KEY}` (the prune plan and architecture "
                "spec written by hfprune); this config has none."
            )
        spec = ArchSpec.from_dict(record["arch"])
        plan = without_dropped(record["plan"])
        for key, stack in spec.stacks.items():
            layers = len(get_module(self.base_model, stack.layers))
            if plan.get(key) is not None and len(plan[key]) != layers:
                raise ValueError(
                    f"config.{HFPRUNE_CONFIG_KEY}.plan['{key}'] keeps {len(plan[key])} layers but the config builds "
                    f"{layers}: the checkpoint's config is inconsistent"
                )
        apply_structure(self.base_model, config, spec, plan)
        if plan.get("hidden") is not None and spec.hidden is not None:
            prune_hidden(self, spec, plan["hidden"])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = load_compact_sparse(cls, pretrained_model_name_or_path, args, kwargs)
        return model if model is not None else super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus the ``prune_plan.json`` hfprune writes beside every pruned
        checkpoint (the plan, the dense model's sizes and ``base_model``, from ``config.hfprune``): a reloaded
        checkpoint saved or pushed again keeps its provenance. With ``push_to_hub=True`` the folder is saved, then
        the model is pushed with ``push_to_hub`` (which saves through this method too): transformers would upload
        from inside its own save, before the plan file is written."""
        save, hub = split_save_arguments(super().save_pretrained, save_directory, *args, **kwargs)
        result = super().save_pretrained(**save)
        if not save.get("is_main_process", True):
            return result
        record = getattr(self.config, HFPRUNE_CONFIG_KEY, None) or {}
        if isinstance(record.get("plan"), dict):
            text = plan_file_text(record["plan"], self.config.model_type, HFPRUNE_VERSION)
            with open(os.path.join(os.fspath(save["save_directory"]), PLAN_FILE), "w") as f:
                f.write(text)
        if hub is not None:
            if "max_shard_size" in save:
                hub["max_shard_size"] = save["max_shard_size"]
            self.push_to_hub(**hub)
        return result

    @staticmethod
    def _finalize_model_loading(model, *args, **kwargs):
        # transformers' step after the checkpoint's tensors are loaded (5.x). Inside a pruned stack every tensor
        # must match what the plan rebuilt: a size mismatch, a missing or an unexpected key there means the plan
        # and the tensors disagree, and reinitialising (or dropping) weights would silently change the model.
        info = kwargs["loading_info"] if "loading_info" in kwargs else args[-1]
        _check_pruned_load(model, info, after=False)
        result = super(PrunedModelMixin, type(model))._finalize_model_loading(model, *args, **kwargs)
        _check_pruned_load(model, info if result is None else result, after=True)
        return result


def load_compact_sparse(cls, path, args: tuple, kwargs: dict):
    """``cls.from_pretrained`` of a compact sparse checkpoint (its ``sparsity_plan.json`` says ``"compact": true``;
    written by ``hfprune.save_sparse``): each sparse weight ``name`` is stored as ``name.__bitmask`` (uint8, bit
    ``k % 8`` of byte ``k // 8`` keeps flat element ``k``), ``name.__values`` (the kept elements) and
    ``name.__shape``, made dense here before loading. ``None`` for any other checkpoint."""
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if k in kwargs}

    def get(name):
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)

    plan = get("sparsity_plan.json") if path is not None else None
    if plan is None:
        return None
    with open(plan, encoding="utf-8") as f:
        if not json.load(f).get("compact"):
            return None
    index = get("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in files if index is not None else ["model.safetensors"]:
        tensors.update(load_file(get(name)))
    bits, state = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8), {}
    for key, value in tensors.items():
        if key.endswith(".__bitmask"):
            name = key[: -len(".__bitmask")]
            shape, values = tensors[name + ".__shape"].tolist(), tensors[name + ".__values"]
            keep = value.unsqueeze(1).bitwise_and(bits).ne(0).flatten()[: math.prod(shape)]
            dense = values.new_zeros(keep.numel())
            dense[keep] = values
            state[name] = dense.reshape(shape)
        elif not key.endswith((".__values", ".__shape")):
            state[key] = value
    config = kwargs.pop("config", None) or cls.config_class.from_pretrained(path, **hub)
    return super(PrunedModelMixin, cls).from_pretrained(None, *args, config=config, state_dict=state, **kwargs)


def _check_pruned_load(model: nn.Module, info, after: bool) -> None:
    """Raise a ValueError for a tensor of a pruned stack that the checkpoint does not supply as it was saved."""
    record = getattr(model.config, HFPRUNE_CONFIG_KEY, None) or {}
    stacks = ArchSpec.from_dict(record["arch"]).stacks.values() if record.get("arch") else ()
    prefix = getattr(model, "base_model_prefix", "") or ""
    roots = tuple(f"{s.layers}." for s in stacks) + tuple(f"{prefix}.{s.layers}." for s in stacks if prefix)

    def in_stack(key: str) -> bool:  # keys are named from the model loaded, or from a model with the prefix
        return bool(roots) and key.startswith(roots)

    where = f"{type(model).__name__} from a checkpoint pruned by hfprune"
    hint = f"config.{HFPRUNE_CONFIG_KEY}.plan does not describe the saved tensors (was config.json edited?)"
    if not after:
        bad = sorted((k, tuple(a), tuple(b)) for k, a, b in getattr(info, "mismatched_keys", ()) if in_stack(k))
        if bad:
            lines = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in bad)
            raise ValueError(f"{where}: size mismatch for {lines}. {hint}")
        return
    missing = sorted(k for k in getattr(info, "missing_keys", ()) if in_stack(k))
    unexpected = sorted(k for k in getattr(info, "unexpected_keys", ()) if in_stack(k))
    if missing or unexpected:
        parts = ([f"missing from the checkpoint: {missing}"] if missing else []) + (
            [f"in the checkpoint but not in the model: {unexpected}"] if unexpected else [])
        raise ValueError(f"{where}: {'; '.join(parts)}. {hint}")


def plan_file_text(plan: dict, model_type: str | None, version: str | None) -> str:
    """The text of ``prune_plan.json``: ``plan`` in its JSON form, with the model type and the hfprune version."""
    head = {"hfprune_version": version} if version is not None else {}
    return json.dumps({**head, "model_type": model_type, **plan}, indent=1) + "\n"


def split_save_arguments(method, *args, **kwargs) -> tuple:
    """``(save, hub)`` for a call ``save_pretrained(*args, **kwargs)`` of ``method`` (a bound transformers
    ``save_pretrained``). ``save``: the call's arguments as keywords, without ``push_to_hub``. ``hub``: ``None``, or
    with ``push_to_hub=True`` the keywords of ``push_to_hub`` (:data:`HUB_ARGUMENTS`, taken out of ``save``;
    ``repo_id`` defaults to the folder's name, as in transformers). Any other argument transformers does not know
    is refused when pushing: transformers would hand it to ``create_repo``."""
    signature = inspect.signature(method)
    bound = signature.bind(*args, **kwargs)
    save = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            save.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"save_pretrained got {len(value)} positional arguments too many")
        else:
            save[name] = value
    if not save.pop("push_to_hub", False):
        return save, None
    hub = {name: save.pop(name) for name in HUB_ARGUMENTS if name in save}
    unknown = sorted(set(save) - set(signature.parameters))
    if unknown:
        raise TypeError(f"save_pretrained(push_to_hub=True) got unknown arguments {unknown}; the Hub arguments "
                        f"are {list(HUB_ARGUMENTS)}")
    if hub.get("repo_id") is None:
        hub["repo_id"] = os.path.basename(os.path.normpath(os.fspath(save["save_directory"])))
    return save, hub

# Copyright hfprune contributors. Apache-2.0.
"""PrunePlan: the single description of a pruned model.

JSON form (one entry per layer, in order)::

    {"layers": [{"heads": [0, 2, 5], "ffn": [1, 4, 9]}, {"drop": true}, {}],
     "decoder_layers": [{"heads": null, "cross_heads": [1], "ffn": []}]}

``heads`` / ``cross_heads`` are kept query-head indices, ``ffn`` (and ``patch_ffn`` / ``channel_ffn`` for
PatchTSMixer, ``shared_ffn`` for a mixture-of-experts' shared expert) kept neuron indices; ``experts`` kept
routed experts of a mixture-of-experts layer and ``expert_ffn`` kept neurons inside them (``e * I + j`` is neuron
``j`` of expert ``e``; every kept expert keeps the same number). ``null`` or a missing key keeps everything,
``[]`` removes the block, ``{"drop": true}`` removes the layer. Indices are always keep-indices of the model the
plan is applied to.
A top-level ``"hidden": [0, 3, ...]`` keeps those hidden (residual stream, embedding) channels in the whole
model (``null`` or missing keeps all).

A plan a model was pruned with (``model.hfprune_plan``, ``prune_plan.json``) also records, under ``dense``, the
dimensions of the model before any pruning (per stack, per layer, per block: ``[heads, kv_heads]`` or
``[neurons]``; ``dense["hidden"]``: its hidden size, where the plan prunes it), and may name the dense model's Hub
id as ``base_model``. Its indices then refer to that model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

ATTENTION_BLOCKS = ("heads", "cross_heads")
FFN_BLOCKS = ("ffn", "patch_ffn", "channel_ffn", "shared_ffn")
EXPERT_BLOCKS = ("experts", "expert_ffn")  # routed experts of a MoE layer, and the neurons inside them
EXPERT_NEURON_MULTIPLE = 8  # neurons kept per expert: what transformers' grouped_mm kernel accepts in bf16 too
BLOCKS = ATTENTION_BLOCKS + FFN_BLOCKS + EXPERT_BLOCKS
STACKS = ("layers", "decoder_layers")
# Keys of the JSON form that describe where a plan comes from, not what it keeps. ``hfprune_version`` is written
# into prune_plan.json, ``format`` into config.json's record.
METADATA_KEYS = ("model_type", "dense", "base_model", "hfprune_version", "format")
HIDDEN = "hidden"  # the top-level key of the kept hidden channels, and of the dense hidden size in ``dense``
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")


class PlanError(ValueError):
    """A plan that cannot describe the model it is meant for. The message names stack, layer and field."""


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps: ``blocks`` maps a block name to sorted keep-indices (``None`` keeps all)."""

    blocks: dict = field(default_factory=dict)
    drop: bool = False

    def get(self, block: str) -> tuple | None:
        return self.blocks.get(block)

    def to_dict(self) -> dict:
        if self.drop:
            return {"drop": True}
        return {name: None if keep is None else list(keep) for name, keep in self.blocks.items()}


@dataclass(frozen=True)
class PrunePlan:
    """Per layer of each stack, the kept attention heads and FFN neurons, and which layers are dropped.

    Example:

    ```python
    >>> from hfprune import PrunePlan
    >>> plan = PrunePlan.from_dict({"layers": [{"heads": [0, 2], "ffn": [1, 4, 9]}, {"drop": True}]})
    >>> plan.layers[0].get("heads")
    (0, 2)
    >>> plan.to_dict()["layers"][1]
    {'drop': True}
    ```
    """

    layers: tuple = ()
    decoder_layers: tuple | None = None
    model_type: str | None = None
    # What the plan was applied to, not what it keeps: plans that keep the same units are equal.
    dense: dict | None = field(default=None, compare=False)
    base_model: str | None = field(default=None, compare=False)
    # kept hidden channels of the whole model (sorted keep-indices), or None: all kept
    hidden: tuple | None = None

    def stacks(self) -> dict:
        out = {"layers": self.layers}
        if self.decoder_layers is not None:
            out["decoder_layers"] = self.decoder_layers
        return out

    # -- JSON ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        allowed = set(STACKS) | set(METADATA_KEYS) | {HIDDEN}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(f"unknown plan key(s) {unknown}; allowed: {sorted(allowed)}")
        if "layers" not in data:
            raise PlanError("a plan needs a 'layers' list (one entry per layer, in order)")
        stacks = {key: _parse_stack(key, data[key]) for key in STACKS if data.get(key) is not None}
        base_model = data.get("base_model")
        if base_model is not None and not isinstance(base_model, str):
            raise PlanError(f"base_model must be a Hub id string or null, got {base_model!r}")
        dense = _parse_dense(data.get("dense"), stacks)
        hidden = _parse_keep(HIDDEN, data.get(HIDDEN))
        if hidden is not None and not hidden:
            raise PlanError("hidden: a model needs at least one hidden channel; [] keeps none")
        return cls(layers=stacks["layers"], decoder_layers=stacks.get("decoder_layers"),
                   model_type=data.get("model_type"), dense=dense, base_model=base_model, hidden=hidden)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.model_type is not None:
            out["model_type"] = self.model_type
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.hidden is not None:
            out[HIDDEN] = list(self.hidden)
        for key, layers in self.stacks().items():
            out[key] = [layer.to_dict() for layer in layers]
        if self.dense is not None:
            out["dense"] = {key: layers if key == HIDDEN else
                            [{name: list(dims) for name, dims in blocks.items()} for blocks in layers]
                            for key, layers in self.dense.items()}
        return out

    def with_dense(self, dims: dict | None) -> PrunePlan:
        """This plan with ``dense`` set to ``dims`` (``model_dims`` of the model before any pruning)."""
        return replace(self, dense=_parse_dense(dims, self.stacks()) if dims is not None else None)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> PrunePlan:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    # -- Queries -------------------------------------------------------------------------------

    def kept_dims(self) -> dict | None:
        """Dimensions of the model this plan leaves, from ``dense``: ``{stack: {dense index: {block: dims}}}`` for
        the layers it keeps, in order, in ``model_dims``' form. ``None`` when ``dense`` is unknown."""
        if self.dense is None:
            return None
        out: dict = {}
        for key, layers in self.stacks().items():
            out[key] = {}
            for i, (layer, blocks) in enumerate(zip(layers, self.dense[key])):
                if layer.drop:
                    continue
                kept = {}
                for name, dims in blocks.items():
                    keep = layer.get(name)
                    if name == "expert_ffn" and layer.get("experts") is not None:
                        kept[name] = (sum(expert_neurons(layer, blocks).values()),)
                    elif keep is None:
                        kept[name] = tuple(dims)
                    elif name in ATTENTION_BLOCKS:
                        group = dims[0] // dims[1] if dims[1] else 1
                        kept[name] = (len(keep), len({h // group for h in keep}))
                    else:
                        kept[name] = (len(keep),)
                out[key][i] = kept
        return out

    def is_empty(self) -> bool:
        """True when the plan removes nothing it could name (every block kept whole, no layer dropped)."""
        return self.hidden is None and all(not layer.drop and all(v is None for v in layer.blocks.values())
                   for layers in self.stacks().values() for layer in layers)

    def validate(self, dims: dict) -> None:
        """Check the plan against a model's dimensions.

        ``dims[stack][i][block]`` is ``(heads, kv_heads)`` for attention blocks and ``(neurons,)`` for FFN
        blocks, as reported by the model's adapter. Raises :class:`PlanError` naming stack, layer and field.
        """
        for key, layers in self.stacks().items():
            if key not in dims:
                raise PlanError(f"'{key}': this model has no such stack; it has {sorted(dims)}")
            model_layers = dims[key]
            if len(layers) != len(model_layers):
                raise PlanError(f"'{key}' has {len(layers)} entries but the model has {len(model_layers)} layers")
            for i, (layer, blocks) in enumerate(zip(layers, model_layers)):
                for name, keep in layer.blocks.items():
                    where = f"{key}[{i}].{name}"
                    if name not in blocks:
                        raise PlanError(f"{where}: this layer has no '{name}' block; it has {sorted(blocks)}")
                    if keep is None:
                        continue
                    size = blocks[name][0]
                    bad = [k for k in keep if k >= size]
                    if bad:
                        raise PlanError(f"{where}: index {bad[0]} out of range; the layer has {size} (0..{size - 1})")
                    if name in ATTENTION_BLOCKS:
                        _check_gqa(where, keep, *blocks[name])
                if "experts" in layer.blocks or "expert_ffn" in layer.blocks:
                    _check_experts(f"{key}[{i}]", layer, blocks)
            dropped = sum(layer.drop for layer in layers)
            if layers and dropped == len(layers):
                raise PlanError(f"'{key}': the plan drops all {dropped} layers; at least one must stay")
        size = dims.get(HIDDEN) if isinstance(dims.get(HIDDEN), int) else None
        if self.hidden is not None and size is not None and self.hidden[-1] >= size:
            raise PlanError(f"hidden: index {self.hidden[-1]} out of range; the model has {size} hidden channels "
                            f"(0..{size - 1})")


def intersect_plans(plan: PrunePlan, before: PrunePlan) -> PrunePlan:
    """``plan`` minus whatever ``before`` already removed (pruning is monotone)."""
    new, old = plan.to_dict(), before.to_dict()
    for stack, layers in new.items():
        if stack == "model_type" or not isinstance(layers, list):
            continue
        for entry, prev in zip(layers, old.get(stack) or []):
            for name in list(entry):
                if name == "drop" or name not in prev or prev[name] is None:
                    continue
                keep = entry[name]
                entry[name] = sorted(set(prev[name]) if keep is None else set(keep) & set(prev[name]))
    return PrunePlan.from_dict(new)


def hub_id(value) -> str | None:
    """``value`` if it reads as a Hub repo id (``owner/name``), else ``None``: local paths (existing ones too),
    ``asset:`` aliases and ``package.module:function`` specs are not ids a model card may name."""
    if not isinstance(value, str) or not _HUB_ID.match(value) or ".." in value or os.path.exists(value):
        return None
    return value


def _parse_dense(dense, stacks: dict) -> dict | None:
    """``dense`` as ``{stack: tuple({block: tuple(ints)})}``, one entry per plan layer."""
    if dense is None:
        return None
    if not isinstance(dense, dict):
        raise PlanError(f"dense must be an object {{stack: [per-layer dims]}}, got {type(dense).__name__}")
    unknown = sorted(set(dense) - set(stacks) - {HIDDEN})
    if unknown:
        raise PlanError(f"dense: stack(s) {unknown} are not in the plan; it has {sorted(stacks)}")
    out = {}
    size = dense.get(HIDDEN)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PlanError(f"dense['hidden'] must be the dense hidden size (a positive integer), got {size!r}")
        out[HIDDEN] = size
    for key, layers in stacks.items():
        entries = dense.get(key)
        if not isinstance(entries, (list, tuple)) or len(entries) != len(layers):
            got = f"{len(entries)} entries" if isinstance(entries, (list, tuple)) else repr(entries)
            raise PlanError(f"dense['{key}'] needs one entry per layer of the plan ({len(layers)}), got {got}")
        parsed = []
        for i, blocks in enumerate(entries):
            if not isinstance(blocks, dict):
                raise PlanError(f"dense['{key}'][{i}] must be an object {{block: dims}}, got {blocks!r}")
            row = {}
            for name, dims in blocks.items():
                size = 2 if name in ATTENTION_BLOCKS else 1
                if name not in BLOCKS or not isinstance(dims, (list, tuple)) or len(dims) != size or any(
                        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
                    want = "[heads, kv_heads]" if size == 2 else "[neurons]"
                    raise PlanError(f"dense['{key}'][{i}].{name} must be {want} (non-negative integers), got {dims!r}")
                row[name] = tuple(dims)
            parsed.append(row)
        out[key] = tuple(parsed)
    return out


def expert_neurons(layer: LayerPlan, blocks: dict) -> dict:
    """``{kept expert: kept neurons}`` of a MoE layer's plan, given the layer's dims (``experts``: ``(E,)``,
    ``expert_ffn``: ``(E * I,)``)."""
    n_experts = blocks["experts"][0]
    width = blocks["expert_ffn"][0] // n_experts if n_experts else 0
    experts = layer.get("experts")
    experts = range(n_experts) if experts is None else experts
    neurons = layer.get("expert_ffn")
    if neurons is None:
        return {e: width for e in experts}
    counts = {e: 0 for e in experts}
    for k in neurons:
        if k // width in counts:
            counts[k // width] += 1
    return counts


def _check_experts(where: str, layer: LayerPlan, blocks: dict) -> None:
    experts = layer.get("experts")
    if experts is not None and not experts:
        raise PlanError(f"{where}.experts: a MoE layer keeps at least one expert (at least the router's top-k)")
    if layer.get("expert_ffn") is None or "experts" not in blocks:
        return
    counts = expert_neurons(layer, blocks)
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"expert {e}: {n}" for e, n in sorted(counts.items())[:8])
        raise PlanError(f"{where}.expert_ffn: every kept expert must keep the same number of neurons (its weights "
                        f"are one 3-D tensor); got {detail}")
    n = next(iter(counts.values()), 0)
    width = blocks["expert_ffn"][0] // blocks["experts"][0]
    if n != width and (n == 0 or n % EXPERT_NEURON_MULTIPLE):
        raise PlanError(f"{where}.expert_ffn keeps {n} neurons per expert; keep a positive multiple of "
                        f"{EXPERT_NEURON_MULTIPLE} (transformers' grouped_mm experts kernel needs 16-byte strides, "
                        f"8 bf16 values), or all {width}")


def _check_gqa(where: str, keep: tuple, heads: int, kv_heads: int) -> None:
    if kv_heads == heads or not keep:
        return
    group = heads // kv_heads
    counts: dict = {}
    for h in keep:
        counts[h // group] = counts.get(h // group, 0) + 1
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"group {g}: {n}" for g, n in sorted(counts.items()))
        raise PlanError(
            f"{where}: GQA needs the same number of kept query heads in every kept key/value group "
            f"({group} query heads per group of {kv_heads}); got {detail}"
        )


def _parse_stack(key: str, entries) -> tuple:
    if not isinstance(entries, list):
        raise PlanError(f"'{key}' must be a list with one entry per layer, got {type(entries).__name__}")
    return tuple(_parse_layer(f"{key}[{i}]", entry) for i, entry in enumerate(entries))


def _parse_layer(where: str, entry) -> LayerPlan:
    if entry is None:
        return LayerPlan()
    if not isinstance(entry, dict):
        raise PlanError(f"{where} must be an object like {{'heads': [...], 'ffn': [...]}}, got {entry!r}")
    unknown = sorted(set(entry) - set(BLOCKS) - {"drop"})
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(BLOCKS + ('drop',))}")
    drop = entry.get("drop", False)
    if not isinstance(drop, bool):
        raise PlanError(f"{where}.drop must be true or false, got {drop!r}")
    if drop:
        others = sorted(k for k, v in entry.items() if k != "drop" and v is not None)
        if others:
            raise PlanError(f"{where}: a dropped layer cannot also keep {others}")
        return LayerPlan(drop=True)
    return LayerPlan(blocks={name: _parse_keep(f"{where}.{name}", entry[name]) for name in BLOCKS if name in entry})


def _parse_keep(where: str, keep) -> tuple | None:
    if keep is None:
        return None
    if not isinstance(keep, (list, tuple)):
        raise PlanError(f"{where} must be a list of kept indices or null, got {keep!r}")
    for k in keep:
        if isinstance(k, bool) or not isinstance(k, int):
            raise PlanError(f"{where}: indices must be integers, got {k!r}")
        if k < 0:
            raise PlanError(f"{where}: indices must be >= 0, got {k}")
    if len(set(keep)) != len(keep):
        dup = next(k for k in keep if list(keep).count(k) > 1)
        raise PlanError(f"{where}: index {dup} appears twice")
    return tuple(sorted(keep))

# Copyright hfprune contributors. Apache-2.0.
"""Which weights carry sparsity masks, applying masks, and the :class:`SparsityPlan` that records them.

Targets are the projections of every attention and FFN block, found with the one block walk
(:func:`hfprune.core.blocks.layer_blocks`): Linear, GPT-2's Conv1D and peft LoRA layers (the mask is on the base
weight; an unmerged adapter's update is not masked). ``targets="blocks+head"`` adds the output head when it is a
Linear layer not tied to the input embeddings. Embeddings are never sparsified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.blocks import iter_layers, layer_blocks, weight_out_in
from ...core.structure import base_layer

PLAN_FORMAT = 1


@dataclass
class Target:
    """One weight that carries a mask: ``name`` is its base weight's parameter name in the model, ``layer``
    ``(stack, index)`` or ``None`` for the head, ``path`` the projection's path in its layer."""

    name: str
    module: nn.Module
    layer: tuple | None
    path: str

    def weight(self) -> torch.Tensor:
        """The base weight as (out, in): a view, so in-place changes reach the parameter (Conv1D included)."""
        return weight_out_in(self.module)

    @property
    def shape(self) -> tuple:
        return tuple(self.weight().shape)


def find_targets(model: nn.Module, targets: str = "blocks") -> list:
    """Every projection of every non-empty attention / FFN block (each once, forward order); with
    ``"blocks+head"`` also the output head."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out, seen = [], set()
    for stack, index, layer, stack_spec in iter_layers(model):
        paths = {id(m): p for p, m in layer.named_modules()}
        for block in layer_blocks(stack, index, layer, stack_spec):
            if block.is_empty() or block.units == 0:
                continue
            for module in block.projections():
                weight = base_layer(module).weight
                if id(weight) in seen:
                    continue
                seen.add(id(weight))
                out.append(Target(names[id(weight)], module, (stack, index), paths.get(id(module), "?")))
    if targets == "blocks+head":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is not None and isinstance(base_layer(head), nn.Linear):
            weight = base_layer(head).weight
            if inputs is not None and weight is getattr(inputs, "weight", None):
                raise ValueError("targets='blocks+head': the head's weight is tied to the input embeddings, so "
                                 "masking it would sparsify the embeddings too; use targets='blocks'")
            out.append(Target(names[id(weight)], head, None, "head"))
    return out


def apply_masks(targets: list, masks: dict) -> None:
    """Zero every weight whose mask entry is False (``masks``: ``{name: bool (out, in)}``), in place."""
    with torch.no_grad():
        for t in targets:
            if t.name in masks:
                w = t.weight()
                w.mul_(masks[t.name].to(w.device, w.dtype))


@dataclass
class SparsityPlan:
    """Per weight name: ``{"pattern": "2:4", "sparsity": 0.5}`` (the sparsity reached), plus the config that made
    it and each weight's layer. JSON-serialisable (``to_dict`` / ``from_dict``); written as ``sparsity_plan.json``."""

    weights: dict = field(default_factory=dict)
    config: dict | None = None
    layers: dict = field(default_factory=dict)  # name -> "stack.index" or "head"

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "config": self.config, "weights": self.weights, "layers": self.layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> SparsityPlan:
        if not isinstance(d, dict) or not isinstance(d.get("weights"), dict):
            raise ValueError("a sparsity plan is a dict with a 'weights' mapping of weight name -> "
                             "{'pattern', 'sparsity'}")
        return cls(weights=dict(d["weights"]), config=d.get("config"), layers=dict(d.get("layers") or {}))

    @property
    def sparsity(self) -> float:
        """Zeros over all planned weights (weighted by size)."""
        total = sum(w["numel"] for w in self.weights.values())
        return sum(w["sparsity"] * w["numel"] for w in self.weights.values()) / max(total, 1)

    def to_markdown(self) -> str:
        """One row per layer: the sparsity of each projection and of the whole layer."""
        rows: dict = {}
        for name, info in self.weights.items():
            rows.setdefault(self.layers.get(name, "?"), {})[name] = info
        paths = []
        for info in self.weights.values():
            if info.get("path", "?") not in paths:
                paths.append(info.get("path", "?"))
        lines = ["| layer | " + " | ".join(paths) + " | layer |", "|---" * (len(paths) + 2) + "|"]
        for layer, infos in rows.items():
            by = {info.get("path", "?"): info for info in infos.values()}
            numel = sum(i["numel"] for i in infos.values())
            zeros = sum(i["sparsity"] * i["numel"] for i in infos.values())
            cells = [f"{by[p]['sparsity']:.3f}" if p in by else "" for p in paths]
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {zeros / max(numel, 1):.3f} |")
        lines.append(f"\nAll {len(self.weights)} weights: sparsity {self.sparsity:.4f}")
        return "\n".join(lines)


def plan_from_weights(targets: list, pattern: str, config: dict | None = None) -> SparsityPlan:
    """The plan of ``targets`` as they are now: each weight's share of exact zeros."""
    plan = SparsityPlan(config=config)
    for t in targets:
        w = t.weight()
        zeros = int((w == 0).sum())
        plan.weights[t.name] = {"pattern": pattern, "sparsity": zeros / w.numel(), "numel": w.numel(),
                                "shape": list(w.shape), "path": t.path}
        plan.layers[t.name] = "head" if t.layer is None else f"{t.layer[0]}.{t.layer[1]}"
    return plan


def layer_groups(targets: list) -> dict:
    """``{(stack, index) or None: [targets]}`` in forward order."""
    out: dict = {}
    for t in targets:
        out.setdefault(t.layer, []).append(t)
    return out

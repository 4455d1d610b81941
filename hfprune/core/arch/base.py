# Copyright hfprune contributors. Apache-2.0.
"""The adapter type and the registry of adapters, keyed by exact ``config.model_type``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..structure import ArchSpec

_REGISTRY: dict = {}


@dataclass(frozen=True)
class StackFields:
    """Config fields that describe one stack's widths, for plans a vanilla config can express.

    ``heads`` / ``kv_heads`` are set only where the family reads an explicit head size (``head_dim``
    names that field, set explicitly so it cannot be re-derived from a smaller head count). ``ffn``
    maps FFN block names to their width field. ``None`` means the config cannot express a change.
    """

    heads: str | None = None
    kv_heads: str | None = None
    head_dim: str | None = None
    ffn: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """One model family: its spec (a function of the config), vanilla-expressible fields, extra checks."""

    name: str
    model_types: tuple
    spec: Callable
    fields: dict = field(default_factory=dict)  # stack key -> StackFields
    check: Callable | None = None  # (config, plan) -> None, raises PlanError
    # config -> {block name: config flag that gives every projection of that block a bias}, for families whose
    # output projections have no bias by default (bias compensation needs one)
    bias_flags: Callable | None = None
    # config -> ``(hidden size field, epsilon field or None)`` when the stock config states a pruned hidden size
    # (the family reads no head size from it); ``None``: a hidden-pruned model saves with its modeling code
    hidden_fields: Callable | None = None

    def arch_spec(self, config) -> ArchSpec:
        return self.spec(config)

    def bias_flag(self, config, block: str) -> str | None:
        """The config flag that adds biases to ``block`` (e.g. Llama's ``mlp_bias``), or ``None``."""
        return (self.bias_flags(config) if self.bias_flags else {}).get(block)


def register(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            other = _REGISTRY[model_type].name
            raise ValueError(f"model_type {model_type!r} is already registered by adapter {other!r}")
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list:
    return sorted(_REGISTRY)


def get_adapter(config_or_model) -> Adapter:
    """The adapter for a model or config, by exact ``model_type``; an error lists the supported ones."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hfprune does not support model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]

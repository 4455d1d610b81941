# Copyright hfprune contributors. Apache-2.0.
"""The hidden size (the residual stream's channels): checks before slicing, the config that states it, and the
modules and parameters that carry it (for costs and importance).

The slicing itself is :func:`hfprune.core.structure.prune_hidden` (a checkpoint's own code runs it at load time).

What a hidden-pruned model computes (the reference the tests check it against): the dense model whose removed
channels are zero everywhere (embedding columns and the rows of every projection that writes the residual stream),
with every norm computing its statistics over the kept channels only. For RMSNorm families (Llama, Mistral, Qwen2,
Qwen3) the slicing folds the dense norm into the sliced one: with ``k`` of ``H`` channels alive,
``mean_H(x^2) = (k / H) mean_k(x^2)``, so ``RMSNorm_H(x) = x / sqrt(mean_k(x^2) + eps H / k) * (w sqrt(H / k))``: norm
weights times ``sqrt(H / k)`` and epsilon times ``H / k``. The sliced model then *is* the dense model with the removed
channels zeroed, and channels that were dead already (zero in the embeddings and in every writer) go with no change
at all. (Qwen3 keeps its epsilon: its per-head q/k norms read the same ``rms_norm_eps``; exact up to epsilon.)
LayerNorm (BERT, GPT-2) also subtracts the mean, which dead channels shift (``mean_H = (k / H) mean_k``) and which
makes them non-zero after the norm (their bias minus the scaled mean): no fold makes the sliced model equal the
dense one, and the sliced LayerNorm computes mean and variance over the kept channels.
"""

from __future__ import annotations

from torch import nn

from .arch import Adapter, get_adapter, supported_model_types
from .plan import PlanError, PrunePlan
from .structure import ArchSpec, base_layer, hidden_sites


def supports_hidden(model: nn.Module, spec: ArchSpec | None = None) -> bool:
    """Whether hfprune can prune ``model``'s hidden size (its family describes it and its head class is known)."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    return spec.hidden is not None and type(model).__name__ in spec.hidden.heads


def hidden_size(model: nn.Module, spec: ArchSpec | None = None) -> int | None:
    """The model's hidden size as its weights have it now (``None`` for a family without a hidden spec)."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    if spec.hidden is None:
        return None
    return hidden_sites(model, spec)["embeddings"][0].weight.shape[1]


def check_hidden(model: nn.Module, plan: PrunePlan, spec: ArchSpec) -> None:
    """Raise :class:`PlanError` before anything changes when ``plan.hidden`` cannot be applied to ``model``."""
    if plan.hidden is None:
        return
    if spec.hidden is None:
        able = [t for t in supported_model_types() if _has_hidden(t)]
        raise PlanError(f"hidden: hfprune cannot prune the hidden size of model_type {model.config.model_type!r}; "
                        f"it can for {', '.join(able)}")
    name = type(model).__name__
    if name not in spec.hidden.heads:
        raise PlanError(f"hidden: the head of {name} is not known to read or not read the hidden channels; "
                        f"hidden-size pruning supports {sorted(spec.hidden.heads)}")
    sites = hidden_sites(model, spec)
    for m in sites["embeddings"]:
        if not isinstance(m, nn.Embedding):
            raise PlanError(f"hidden: the embedding is a {type(m).__name__} (an adapter on it?), not nn.Embedding; "
                            "merge or remove it before pruning the hidden size")
    size = sites["embeddings"][0].weight.shape[1]
    if plan.hidden[-1] >= size:
        raise PlanError(f"hidden: index {plan.hidden[-1]} out of range; the model has {size} hidden channels "
                        f"(0..{size - 1})")


def _has_hidden(model_type: str) -> bool:
    """Whether the family of ``model_type`` describes its hidden size (for error messages)."""
    from transformers import AutoConfig

    try:
        return get_adapter(AutoConfig.for_model(model_type)).arch_spec(AutoConfig.for_model(model_type)).hidden \
            is not None
    except Exception:  # noqa: BLE001 - a config that cannot be built by type alone: not listed
        return False


def hidden_updates(adapter: Adapter, model: nn.Module, spec: ArchSpec, total: PrunePlan) -> dict | None:
    """Config fields that state the pruned hidden size (``{}`` when ``total`` keeps every channel), or ``None``
    when the stock config cannot (the family derives its head size from it: BERT, GPT-2)."""
    if total.hidden is None:
        return {}
    fields = adapter.hidden_fields(model.config) if adapter.hidden_fields is not None else None
    if fields is None:
        return None
    size_field, eps_field = fields
    sites = hidden_sites(model, spec)
    updates = {size_field: sites["embeddings"][0].weight.shape[1]}
    if eps_field is not None and spec.hidden.eps_attr is not None:
        updates[eps_field] = getattr(sites["norms"][0], spec.hidden.eps_attr)
    return updates


def dense_hidden_updates(adapter: Adapter, config, dense_size: int) -> dict:
    """The config fields of the dense model's hidden size (and epsilon, unfolded) for a plainly pruned ``config``,
    for a record relative to the dense model."""
    fields = adapter.hidden_fields(config) if adapter.hidden_fields is not None else None
    spec = adapter.arch_spec(config)
    if fields is None or spec.hidden is None:
        return {}
    size_field, eps_field = fields
    updates = {size_field: dense_size}
    if eps_field is not None and spec.hidden.eps_attr is not None:
        updates[eps_field] = getattr(config, eps_field) * getattr(config, size_field) / dense_size
    return updates


def hidden_parameters(model: nn.Module, spec: ArchSpec | None = None) -> list:
    """``[(parameter, dim)]``: every parameter with a hidden-channel dimension, each once (a tied head once)."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    sites = hidden_sites(model, spec)
    out, seen = [], set()

    def add(param, dim):
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            out.append((param, dim))

    for m in sites["embeddings"]:
        add(m.weight, 1)
    for m in sites["norms"]:
        add(m.weight, 0)
        add(getattr(m, "bias", None), 0)
    conv = [type(base_layer(m)).__name__ == "Conv1D" for m in sites["readers"] + (sites["heads"] or [])]
    for m, is_conv in zip(sites["readers"] + (sites["heads"] or []), conv):
        add(base_layer(m).weight, 0 if is_conv else 1)
    for m in sites["writers"]:
        base = base_layer(m)
        add(base.weight, 1 if type(base).__name__ == "Conv1D" else 0)
        add(base.bias, 0)
    for m in sites["empty"]:
        if getattr(m, "kind", "bias") != "context":
            add(m.bias, 0)
    return out


def norm_modules(model: nn.Module, spec: ArchSpec | None = None) -> list:
    """Every norm over the hidden channels: the base model's (embedding or final norm), then each layer's."""
    spec = spec or get_adapter(model).arch_spec(model.config)
    return hidden_sites(model, spec)["norms"]

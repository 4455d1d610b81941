# Copyright hfprune contributors. Apache-2.0.
"""A pruned model keeps its transformers class, under a thin subclass whose ``save_pretrained`` is ours.

Swapping ``__class__`` (no re-init, no copy) is what lets ``trainer.save_model()`` and
``model.save_pretrained()`` write a checkpoint that reloads, without the user changing how they save.
"""

from __future__ import annotations

from torch import nn

from ..plan import PrunePlan

_CLASSES: dict = {}


class HfprunedModel:
    """Mixin added to a pruned model's class; ``hfprune_plan`` holds the plan it was pruned with."""

    hfprune_plan: PrunePlan | None = None
    hfprune_heterogeneous: bool = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        from .save import save_pruned

        return save_pruned(self, save_directory, *args, **kwargs)


def original_class(model: nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[1] if issubclass(cls, HfprunedModel) and cls in _CLASSES.values() else cls


def mark_pruned(model: nn.Module, plan: PrunePlan, heterogeneous: bool) -> None:
    base = original_class(model)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Hfpruned{base.__name__}", (HfprunedModel, base), {"__module__": __name__})
    model.__class__ = _CLASSES[base]
    model.hfprune_plan = plan
    model.hfprune_heterogeneous = heterogeneous

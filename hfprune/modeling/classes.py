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
    """The transformers class under hfprune's classes: our ``Hfpruned*`` wrapper, and the ``Pruned*`` class of a
    pruned checkpoint's code (from its remote ``modeling_hfprune.py`` or from ``hfprune.from_pretrained``).

    Saving names this class in ``architectures`` and writes code that subclasses it; a ``Pruned*`` class from a
    checkpoint's module would also make transformers copy that module's source (and its imports) on save.
    """
    return class_under(type(model))


def class_under(cls: type) -> type:
    """:func:`original_class` of a class."""
    while True:
        if issubclass(cls, HfprunedModel) and cls in _CLASSES.values():
            cls = cls.__bases__[1]
        elif is_pruned_code_class(cls):
            cls = cls.__bases__[-1]
        else:
            return cls


def is_pruned_code_class(cls: type) -> bool:
    """A ``class PrunedX(PrunedModelMixin, X)``: matched by the mixin's name, since each checkpoint's
    ``modeling_hfprune.py`` defines its own copy of it."""
    bases = cls.__bases__
    return len(bases) == 2 and bases[0].__name__ == "PrunedModelMixin" and cls.__name__ == f"Pruned{bases[1].__name__}"


def mark_pruned(model: nn.Module, plan: PrunePlan, heterogeneous: bool) -> None:
    base = original_class(model)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Hfpruned{base.__name__}", (HfprunedModel, base), {"__module__": __name__})
    model.__class__ = _CLASSES[base]
    model.hfprune_plan = plan
    model.hfprune_heterogeneous = heterogeneous

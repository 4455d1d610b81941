# Copyright hfprune contributors. Apache-2.0.
"""Which transformers class a pruned model really is, under the classes hfprune puts on top of it.

A pruned model keeps its transformers class ``X`` under a thin subclass ``HfprunedX`` (:mod:`.pruned` makes it, so
that ``save_pretrained`` is hfprune's); a checkpoint's own code adds ``PrunedX``. Saving and loading need ``X``.
"""

from __future__ import annotations

from torch import nn

from ..plan import PrunePlan

# transformers class -> the HfprunedX subclass made for it (one per class, so isinstance checks stay cheap)
PRUNED_CLASSES: dict = {}


class HfprunedModel:
    """Base of every pruned model's class; ``hfprune_plan`` holds the plan it was pruned with."""

    hfprune_plan: PrunePlan | None = None
    hfprune_heterogeneous: bool = False


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
        if issubclass(cls, HfprunedModel) and cls in PRUNED_CLASSES.values():
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

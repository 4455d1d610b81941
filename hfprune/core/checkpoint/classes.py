# Copyright hfprune contributors. Apache-2.0.
"""Which transformers class a pruned model really is, under the classes hfprune puts on top of it.

A pruned model keeps its transformers class ``X`` under a thin subclass (:mod:`.pruned` makes it, so that
``save_pretrained`` is hfprune's); a checkpoint's own code adds ``class X(PrunedModelMixin, transformers.X)``
(``PrunedX`` in checkpoints of earlier hfprune versions). Saving and loading need ``X``.

Every one of these classes is *named* ``X``: transformers identifies a model by its class name. ``pipeline(task)``
logs "The model 'PrunedX' is not supported for <task>" for any name outside the task's list of class names, the
Trainer shifts labels for label smoothing only for causal-LM class names, and ``save_pretrained`` writes the name
into ``architectures`` (where hfprune's loader and transformers' look it up).
"""

from __future__ import annotations

from torch import nn

from ..plan import PrunePlan

# transformers class -> the subclass hfprune made for it (one per class, so isinstance checks stay cheap)
PRUNED_CLASSES: dict = {}


class HfprunedModel:
    """Base of every pruned model's class; ``hfprune_plan`` holds the plan it was pruned with. Test for a model
    hfprune pruned with ``isinstance(model, HfprunedModel)``: the class's name is its transformers class's."""

    hfprune_plan: PrunePlan | None = None
    hfprune_heterogeneous: bool = False


def original_class(model: nn.Module) -> type:
    """The transformers class under hfprune's classes: our wrapper (:mod:`.pruned`), and the ``PrunedModelMixin``
    class of a pruned checkpoint's code (from its remote ``modeling_hfprune.py`` or from ``hfprune.from_pretrained``).

    Saving names this class in ``architectures`` and writes code that subclasses it; a class from a checkpoint's
    module would also make transformers copy that module's source (and its imports) on save.
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
    """A ``class X(PrunedModelMixin, X)`` (or ``PrunedX``, as earlier versions named it): matched by the mixin's name,
    since each checkpoint's ``modeling_hfprune.py`` defines its own copy of it."""
    bases = cls.__bases__
    return len(bases) == 2 and bases[0].__name__ == "PrunedModelMixin" \
        and cls.__name__ in (bases[1].__name__, f"Pruned{bases[1].__name__}")

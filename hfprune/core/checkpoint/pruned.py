# Copyright hfprune contributors. Apache-2.0.
"""A pruned model keeps its transformers class, under a thin subclass whose ``save_pretrained`` is hfprune's.

Swapping ``__class__`` (no re-init, no copy) is what lets ``trainer.save_model()`` and
``model.save_pretrained()`` write a checkpoint that reloads, without the user changing how they save.
"""

from __future__ import annotations

from torch import nn

from ..plan import PrunePlan
from .classes import PRUNED_CLASSES, HfprunedModel, original_class
from .save import save_pruned


class SavesPruned(HfprunedModel):
    """The mixin of ``HfprunedX``: saving writes the plan, and the modeling code a per-layer plan needs."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        return save_pruned(self, save_directory, *args, **kwargs)


def mark_pruned(model: nn.Module, plan: PrunePlan, heterogeneous: bool) -> None:
    """Give ``model`` the class ``HfprunedX`` (``X`` its transformers class) and record ``plan`` on it."""
    base = original_class(model)
    if base not in PRUNED_CLASSES:
        PRUNED_CLASSES[base] = type(f"Hfpruned{base.__name__}", (SavesPruned, base), {"__module__": __name__})
    model.__class__ = PRUNED_CLASSES[base]
    model.hfprune_plan = plan
    model.hfprune_heterogeneous = heterogeneous

# Copyright hfprune contributors. Apache-2.0.
"""A pruned model keeps its transformers class, under a thin subclass whose ``save_pretrained`` is hfprune's.

Swapping ``__class__`` (no re-init, no copy) is what lets ``trainer.save_model()`` and
``model.save_pretrained()`` write a checkpoint that reloads, without the user changing how they save. The subclass
keeps the transformers class's name (see :mod:`.classes`), so ``pipeline(task, model=model)`` accepts it.
"""

from __future__ import annotations

from torch import nn

from ..plan import PrunePlan
from .classes import PRUNED_CLASSES, HfprunedModel, original_class
from .save import save_pruned


class SavesPruned(HfprunedModel):
    """The mixin of hfprune's pruned classes: saving writes the plan, and the modeling code a per-layer plan needs."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        return save_pruned(self, save_directory, *args, **kwargs)


def mark_pruned(model: nn.Module, plan: PrunePlan, heterogeneous: bool) -> None:
    """Give ``model`` hfprune's subclass of its transformers class ``X`` (named ``X`` too, in this module) and record
    ``plan`` on it."""
    base = original_class(model)
    if base not in PRUNED_CLASSES:
        PRUNED_CLASSES[base] = type(base.__name__, (SavesPruned, base), {
            "__module__": __name__, "__qualname__": base.__name__,
            "__doc__": f"``transformers.{base.__name__}`` pruned by hfprune (``model.hfprune_plan``); "
                       "``save_pretrained`` writes the plan, and the modeling code a per-layer plan needs."})
    model.__class__ = PRUNED_CLASSES[base]
    model.hfprune_plan = plan
    model.hfprune_heterogeneous = heterogeneous

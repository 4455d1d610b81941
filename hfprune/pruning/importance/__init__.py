# Copyright hfprune contributors. Apache-2.0.
"""Importance criteria behind one interface, registered by name.

A criterion returns one score tensor per prunable block, keyed like :attr:`hfprune.core.masking.Masks.gates`:
``(stack, layer, block) -> (heads,)`` or ``(neurons,)``. Higher means more important. Each criterion declares
what it reads and how it behaves (:class:`Importance`); ``PruningConfig.build_importance()`` builds it from those.
"""

from __future__ import annotations

# importing a criterion's module registers it: adding a criterion is one file here plus its name in this line
from . import activation, fisher, fluctuation, magnitude, random_scores, reap, routing_frequency, taylor  # noqa: F401
from .base import Importance, get_importance, importance_class, register_importance, supported_importance

__all__ = ["Importance", "get_importance", "importance_class", "register_importance", "supported_importance"]

# Copyright hfprune contributors. Apache-2.0.
"""Importance criteria behind one interface, registered by name.

A criterion returns one score tensor per prunable block, keyed like :attr:`hfprune.masking.Masks.gates`:
``(stack, layer, block) -> (heads,)`` or ``(neurons,)``. Higher means more important.
"""

from __future__ import annotations

from . import activation, fisher, fluctuation, magnitude, random_, taylor  # noqa: F401,E402  (registers them)
from .base import Importance, get_importance, register_importance, supported_importance

__all__ = ["Importance", "get_importance", "register_importance", "supported_importance"]

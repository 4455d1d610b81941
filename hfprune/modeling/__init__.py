"""Pruned checkpoints: the classes a pruned model takes on, and atomic saving with generated modeling code."""

from .classes import mark_pruned
from .save import save_pruned

__all__ = ["mark_pruned", "save_pruned"]

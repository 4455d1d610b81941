"""Pruned checkpoints: the classes a pruned model takes on, saving (staged into the folder, with generated modeling
code where a plan needs it) and loading with the installed hfprune."""

from .pruned import mark_pruned
from .save import save_pruned

__all__ = ["mark_pruned", "save_pruned"]

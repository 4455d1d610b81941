# Copyright hfprune contributors. Apache-2.0.
"""Searched shapes: uniform candidates across depth, hidden size, key/value groups, FFN width and experts under one
budget, scored retraining-free, the best kept. :func:`search` with a :class:`SearchConfig`; ``hfprune search``."""

from .config import AXES, BUDGETS, SearchConfig
from .report import save_report
from .runner import SearchResult, search

__all__ = ["AXES", "BUDGETS", "SearchConfig", "SearchResult", "save_report", "search"]

# Copyright hfprune contributors. Apache-2.0.
"""Weight-level sparsity: unstructured, N:M and block masks chosen by magnitude, Wanda, SparseGPT, movement or at
random, uniform or OWL per-layer ratios; one-shot (:func:`sparsify`), on a training schedule
(:class:`SparsityCallback`), saved with zeros in place or compact (:func:`save_sparse`)."""

from .checkpoint import save_sparse
from .config import SparsityConfig
from .oneshot import SparsityResult, sparsify
from .targets import SparsityPlan

__all__ = ["SparsityConfig", "SparsityPlan", "SparsityResult", "save_sparse", "sparsify"]

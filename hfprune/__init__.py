# Copyright hfprune contributors. Apache-2.0.
"""hfprune: structured pruning for Hugging Face transformers that physically removes weights."""

from .apply import apply_plan, model_dims
from .arch import get_adapter, supported_model_types
from .config import PruningConfig
from .importance import supported_importance
from .oneshot import PruneResult, prune
from .plan import LayerPlan, PlanError, PrunePlan
from .version import __version__

__all__ = [
    "LayerPlan",
    "PlanError",
    "PrunePlan",
    "PruneResult",
    "PruningConfig",
    "__version__",
    "apply_plan",
    "get_adapter",
    "model_dims",
    "prune",
    "supported_importance",
    "supported_model_types",
]

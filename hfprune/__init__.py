# Copyright hfprune contributors. Apache-2.0.
"""hfprune: structured pruning for Hugging Face transformers that physically removes weights."""

from .apply import apply_plan, model_dims
from .arch import get_adapter, supported_model_types
from .callback import PruningCallback
from .config import PruningConfig
from .distill import DistillationConfig, DistillationTrainer
from .importance import supported_importance
from .oneshot import PruneResult, prune
from .plan import LayerPlan, PlanError, PrunePlan
from .schedule import ScheduleConfig
from .version import __version__

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "LayerPlan",
    "PlanError",
    "PrunePlan",
    "PruneResult",
    "PruningCallback",
    "PruningConfig",
    "ScheduleConfig",
    "__version__",
    "apply_plan",
    "get_adapter",
    "model_dims",
    "prune",
    "supported_importance",
    "supported_model_types",
]

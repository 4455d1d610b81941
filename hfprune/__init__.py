# Copyright hfprune contributors. Apache-2.0.
"""hfprune: structured pruning for Hugging Face transformers that physically removes weights.

Importing ``hfprune`` is cheap: the public names below load their modules (and torch, transformers) on first
use, so ``hfprune --help`` and ``import hfprune`` in a script that only reads a plan stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .version import __version__

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "AutoPrunedModel": ".modeling.load",
    "DistillationConfig": ".distill",
    "DistillationTrainer": ".distill",
    "LayerPlan": ".plan",
    "PlanError": ".plan",
    "PrunePlan": ".plan",
    "PruneResult": ".oneshot",
    "PruningCallback": ".callback",
    "PruningConfig": ".config",
    "ScheduleConfig": ".schedule",
    "apply_plan": ".apply",
    "from_pretrained": ".modeling.load",
    "get_adapter": ".arch",
    "model_dims": ".apply",
    "prune": ".oneshot",
    "supported_importance": ".importance",
    "supported_model_types": ".arch",
}

__all__ = [
    "AutoPrunedModel",
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
    "from_pretrained",
    "get_adapter",
    "model_dims",
    "prune",
    "supported_importance",
    "supported_model_types",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        # `hfprune.cost.estimate(...)` after a bare `import hfprune` worked when this file imported everything
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'hfprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .apply import apply_plan, model_dims
    from .arch import get_adapter, supported_model_types
    from .callback import PruningCallback
    from .config import PruningConfig
    from .distill import DistillationConfig, DistillationTrainer
    from .importance import supported_importance
    from .modeling.load import AutoPrunedModel, from_pretrained
    from .oneshot import PruneResult, prune
    from .plan import LayerPlan, PlanError, PrunePlan
    from .schedule import ScheduleConfig

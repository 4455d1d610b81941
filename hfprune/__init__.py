# Copyright hfprune contributors. Apache-2.0.
"""hfprune: structured pruning for Hugging Face transformers that physically removes weights.

Importing ``hfprune`` is cheap: the public names below load their modules (and torch, transformers) on first
use, so ``hfprune --help`` and ``import hfprune`` in a script that only reads a plan stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from . import _moved
from .version import __version__

_moved.install()  # the import paths of hfprune <= 0.1 (hfprune.apply, hfprune.modeling.save, ...) keep working

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "AutoPrunedModel": ".core.checkpoint.load",
    "DistillationConfig": ".distill",
    "DistillationTrainer": ".distill",
    "LayerPlan": ".core.plan",
    "PlanError": ".core.plan",
    "PrunePlan": ".core.plan",
    "PruneResult": ".pruning.oneshot",
    "PrunedPushCallback": ".core.checkpoint.trainer_push",
    "PruningCallback": ".pruning.callback",
    "PruningConfig": ".pruning.config",
    "ScheduleConfig": ".pruning.schedule",
    "SparsityCallback": ".pruning.sparsity.callback",
    "SparsityConfig": ".pruning.sparsity",
    "apply_plan": ".core.apply",
    "from_pretrained": ".core.checkpoint.load",
    "get_adapter": ".core.arch",
    "model_dims": ".core.apply",
    "prune": ".pruning.oneshot",
    "save_sparse": ".pruning.sparsity",
    "sparsify": ".pruning.sparsity",
    "supported_importance": ".pruning.importance",
    "supported_model_types": ".core.arch",
}

__all__ = [
    "AutoPrunedModel",
    "DistillationConfig",
    "DistillationTrainer",
    "LayerPlan",
    "PlanError",
    "PrunePlan",
    "PruneResult",
    "PrunedPushCallback",
    "PruningCallback",
    "PruningConfig",
    "ScheduleConfig",
    "SparsityCallback",
    "SparsityConfig",
    "__version__",
    "apply_plan",
    "from_pretrained",
    "get_adapter",
    "model_dims",
    "prune",
    "save_sparse",
    "sparsify",
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
    from .core.apply import apply_plan, model_dims
    from .core.arch import get_adapter, supported_model_types
    from .core.checkpoint.load import AutoPrunedModel, from_pretrained
    from .core.plan import LayerPlan, PlanError, PrunePlan
    from .distill import DistillationConfig, DistillationTrainer
    from .pruning.callback import PruningCallback
    from .pruning.config import PruningConfig
    from .pruning.importance import supported_importance
    from .pruning.oneshot import PruneResult, prune
    from .pruning.schedule import ScheduleConfig
    from .pruning.sparsity import SparsityConfig, save_sparse, sparsify
    from .pruning.sparsity.callback import SparsityCallback

# Copyright hfprune contributors. Apache-2.0.
"""Import paths from before the package was layered (``hfprune.apply``, ``hfprune.modeling.save``, ...) keep
working: each old module name is an alias of the module that now holds the code (the same object, so
``monkeypatch.setattr`` on either name patches both)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module (or package) -> where it lives now; submodules of a moved package follow it
MOVED = {
    "hfprune.plan": "hfprune.core.plan",
    "hfprune.structure": "hfprune.core.structure",
    "hfprune.arch": "hfprune.core.arch",
    "hfprune.apply": "hfprune.core.apply",
    "hfprune.masking": "hfprune.core.masking",
    "hfprune.cost": "hfprune.core.cost",
    "hfprune.blocks": "hfprune.core.blocks",
    "hfprune.calibration": "hfprune.core.calibration",
    "hfprune.modeling": "hfprune.core.checkpoint",
    "hfprune.config": "hfprune.pruning.config",
    "hfprune.importance": "hfprune.pruning.importance",
    "hfprune.importance.random_": "hfprune.pruning.importance.random_scores",
    "hfprune.select": "hfprune.pruning.budget",
    "hfprune.latency": "hfprune.pruning.latency",
    "hfprune.depth": "hfprune.pruning.depth",
    "hfprune.schedule": "hfprune.pruning.schedule",
    "hfprune.oneshot": "hfprune.pruning.oneshot",
    "hfprune.callback": "hfprune.pruning.callback",
    "hfprune.recovery": "hfprune.pruning.recovery",
    "hfprune.obs": "hfprune.pruning.recovery.obs",
    "hfprune.pruning.obs": "hfprune.pruning.recovery.obs",
    "hfprune.recipe": "hfprune.pipeline.recipe",
    "hfprune.cli": "hfprune.pipeline.cli",
    "hfprune.run": "hfprune.pipeline.run",
    "hfprune.card": "hfprune.pipeline.card",
    "hfprune.report": "hfprune.pipeline.report",
    "hfprune.hub": "hfprune.pipeline.hub",
}


def current_name(name: str) -> str | None:
    """Where the module once called ``name`` lives now, or ``None`` if it never moved."""
    best = max((old for old in MOVED if name == old or name.startswith(old + ".")), key=len, default=None)
    return None if best is None else MOVED[best] + name[len(best):]


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the alias spec on the shared module: put it back


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module name to the module object at its new place."""

    def find_spec(self, name, path=None, target=None):
        new = current_name(name)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        # First: a moved package's folder is on its alias's __path__, so the path finder would load a second copy of
        # its submodules under the old name. Only old names are answered here; they exist nowhere else.
        sys.meta_path.insert(0, MovedModuleFinder())

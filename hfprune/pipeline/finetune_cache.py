# Copyright hfprune contributors. Apache-2.0.
"""The key of the fine-tune stage's cache: what shapes the fine-tuned model (the base model's files, the training
data's contents, how they are read and tokenised, the task, the training arguments, the seed) and nothing else.
Pure functions of files and settings; :func:`hfprune.pipeline.run.finetune` reads the data and calls them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

# Files of a model folder that do not change the model: the fine-tune cache key skips them.
MODEL_FILES_SKIPPED = (".md",)
# DataSpec keys that do not change what the fine-tune stage trains on: the train split's contents stand for the
# loader, its paths and seed (a loader's `format` and `kwargs` too, except for `files`, whose bytes are hashed
# before parsing); the other splits, the calibration/evaluation sizes and `freq` (MASE's season) are read after
# it. Every other key (columns, max_length, a key added later) is in the cache key.
NOT_TRAINING_DATA = ("loader", "files", "seed", "train_split", "validation_split", "eval_split", "calibration_samples",
                     "calibration_batch_size", "max_eval_samples", "freq")


def _sha256(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest


def model_digest(directory: Path) -> str:
    """SHA-256 of a model folder's files (config, weights, tokenizer: every top-level file but hidden ones and
    ``*.md``), names and bytes. Read in full each time: the alternative, size and mtime, misses a file rewritten
    in place and changes when a folder is copied; reading runs at disk speed (~0.1 s for MiniLM's 90 MB, seconds
    for a 1B-parameter model), small next to the run it keys."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix not in MODEL_FILES_SKIPPED:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            _sha256(path, digest)
    return digest.hexdigest()


def files_digest(paths) -> str:
    """SHA-256 of the bytes of ``paths`` in order (names left out: moved or renamed files keep their digest)."""
    digest = hashlib.sha256()
    for path in paths:
        _sha256(Path(path), digest).update(b"\0")
    return digest.hexdigest()


def finetune_settings(recipe, base: Path, train_digest: str) -> dict:
    """Everything that shapes the fine-tuned model, and nothing else: the base model's files, the training data's
    contents and how they are read and tokenised, the task and head, the training arguments and the seed. Not the
    recipe's name nor any path: the same stage under another name, or the same files moved, reuses the model."""
    d = recipe.data
    skipped = NOT_TRAINING_DATA + (() if d.loader == "files" else ("format", "kwargs"))
    prepared = {f.name: getattr(d, f.name) for f in fields(d) if f.init and f.name not in skipped}
    return {"model": model_digest(base), "task": recipe.model.task, "num_labels": recipe.model.num_labels,
            "data": {"train": train_digest, **prepared},
            "training": recipe.finetune.training, "seed": recipe.seed}


def cache_key(settings: dict) -> str:
    """The cache folder's name for ``settings`` (:func:`finetune_settings`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

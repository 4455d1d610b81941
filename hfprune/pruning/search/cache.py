# Copyright hfprune contributors. Apache-2.0.
"""The search's disk cache: per-axis importance scores (safetensors) and candidate evaluations (JSON), keyed by a
fingerprint of the model's weights, the data and the settings that change them, so a new budget rescores nothing.

Files (under ``cache_dir``): ``scores-<key>.safetensors`` (one tensor per axis and block) and
``evals-<key>.json`` (``{plan digest: evaluation}``). Only files named this way are read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...core.apply import unwrap


def model_fingerprint(model: nn.Module) -> str:
    """Digest of the config and every parameter's name, shape and sums: a changed weight changes it."""
    model = unwrap(model)
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach()
            h.update(f"{name}{tuple(t.shape)}{float(t.float().sum(dtype=torch.float64)):.10e}"
                     f"{float(t.float().abs().sum(dtype=torch.float64)):.10e}".encode())
    return h.hexdigest()[:20]


def data_fingerprint(batches: list) -> str:
    """Digest of the token ids (and masks, labels) of ``batches``."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _name(key: tuple) -> str:
    return ".".join(str(k) for k in key)


class SearchCache:
    """Scores per axis and evaluations per plan; ``directory=None`` keeps them in memory only."""

    def __init__(self, directory: str | os.PathLike | None, scores_key: str, evals_key: str):
        self.directory = Path(directory) if directory is not None else None
        self.scores_key, self.evals_key = scores_key, evals_key
        self._evals: dict | None = None

    # -- scores: {axis: tensor} or {axis: {block key: tensor}} ------------------------------------------------

    @property
    def scores_path(self) -> Path | None:
        return None if self.directory is None else self.directory / f"scores-{self.scores_key}.safetensors"

    def load_scores(self) -> dict:
        path = self.scores_path
        if path is None or not path.exists():
            return {}
        out: dict = {}
        for name, tensor in load_file(str(path)).items():
            axis, _, rest = name.partition("/")
            if not rest:
                out[axis] = tensor
            else:
                stack, layer, block = rest.split(".")
                out.setdefault(axis, {})[(stack, int(layer), block)] = tensor
        return out

    def save_scores(self, scores: dict) -> None:
        path = self.scores_path
        if path is None:
            return
        flat = {}
        for axis, value in scores.items():
            if isinstance(value, dict):
                flat.update({f"{axis}/{_name(k)}": v.detach().float().cpu().contiguous() for k, v in value.items()})
            else:
                flat[axis] = value.detach().float().cpu().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda tmp: save_file(flat, tmp, metadata={"format": "hfprune-search-scores"}))

    # -- evaluations: {plan digest: dict} -----------------------------------------------------------------------

    @property
    def evals_path(self) -> Path | None:
        return None if self.directory is None else self.directory / f"evals-{self.evals_key}.json"

    def _load_evals(self) -> dict:
        if self._evals is None:
            path = self.evals_path
            self._evals = json.loads(path.read_text()) if path is not None and path.exists() else {}
        return self._evals

    def get_eval(self, plan_key: str) -> dict | None:
        return self._load_evals().get(plan_key)

    def put_eval(self, plan_key: str, value: dict) -> None:
        evals = self._load_evals()
        evals[plan_key] = value
        path = self.evals_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(evals, indent=1, sort_keys=True)))


def _write_atomically(path: Path, write) -> None:
    """``write(temporary path)`` then rename it onto ``path``: a reader never sees half a file, and two searches
    sharing a cache never write the same temporary file (a unique name hfprune created; removed on failure)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hfprune-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

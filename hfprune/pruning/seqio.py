# Copyright hfprune contributors. Apache-2.0.
"""What sequential pruning keeps outside memory: the calibration hidden states between layers (in memory, or as
safetensors files in an offload folder), and the pruned checkpoint's weight shards, written as layers finish into
the save's staging folder (:class:`~hfprune.core.checkpoint.transaction.Transaction`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD = "model-{:05d}-of-{:05d}.safetensors"
INDEX = "model.safetensors.index.json"
PENDING = "pending-weights"  # shards wait here until save_pretrained has written the config beside them


def check_writable(folder) -> Path:
    """``folder`` as a Path, created if missing, or a ``PermissionError`` / ``NotADirectoryError`` naming it."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"offload_dir={str(folder)!r} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".hfprune-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"offload_dir={str(folder)!r} is not writable ({err.strerror or err}); give a folder "
                              "this process can write") from None
    return path


class HiddenStore:
    """Hidden states of the calibration batches, one tensor per batch, replaced layer after layer. In memory, or
    with ``offload_dir`` as one safetensors file per batch in a folder of its own there (removed by :meth:`close`;
    nothing else in ``offload_dir`` is touched)."""

    def __init__(self, offload_dir=None):
        self.folder = None
        self.items: dict = {}
        if offload_dir is not None:
            self.folder = check_writable(offload_dir) / f"hfprune-activations-{uuid.uuid4().hex[:12]}"
            self.folder.mkdir()

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self.items[key] = tensor
        else:
            save_file({"h": tensor.contiguous()}, str(self.folder / f"{key}.safetensors"))

    def get(self, key: str) -> torch.Tensor:
        if self.folder is None:
            return self.items[key]
        return load_file(str(self.folder / f"{key}.safetensors"))["h"]

    def close(self) -> None:
        self.items.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class ShardWriter:
    """Weight shards written one by one into ``staging/pending-weights/``, then moved beside the config with their
    index by :meth:`finish` (after ``save_pretrained`` wrote the config, which would take loose shards for stale
    ones of its own)."""

    def __init__(self, staging: Path, total: int):
        self.staging = Path(staging)
        self.pending = self.staging / PENDING
        self.pending.mkdir()
        self.total = total
        self.count = 0
        self.weight_map: dict = {}
        self.size = 0

    def write(self, tensors: dict) -> None:
        self.count += 1
        name = SHARD.format(self.count, self.total)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(self.pending / name),
                  metadata={"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.size += value.numel() * value.element_size()

    def finish(self) -> None:
        if self.count != self.total:
            raise RuntimeError(f"wrote {self.count} weight shards, expected {self.total}")
        for name in sorted(os.listdir(self.pending)):
            os.replace(self.pending / name, self.staging / name)
        self.pending.rmdir()
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextmanager
def layer_pass(model, offload_dir=None):
    """What a layer-by-layer pass over ``model`` runs under; yields ``(store, use_cache)``: a :class:`HiddenStore`
    for the calibration hidden states (on disk with ``offload_dir``; closed afterwards) and the config's own
    ``use_cache``, which is off meanwhile (a KV cache would grow with every replayed layer) and restored after, as
    is autograd, which is off."""
    use_cache = getattr(model.config, "use_cache", None)
    store = HiddenStore(offload_dir)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        with torch.no_grad():
            yield store, use_cache
    finally:
        store.close()
        if use_cache is not None:
            model.config.use_cache = use_cache

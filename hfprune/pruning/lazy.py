# Copyright hfprune contributors. Apache-2.0.
"""A model whose weights stay on disk: built on the meta device (accelerate's ``init_empty_weights``), with the
embeddings and other tensors outside the layer stack loaded, and one layer at a time materialised from the
checkpoint's safetensors files (``safe_open``, ``set_module_tensor_to_device``) when asked for.

Sequential pruning (:mod:`hfprune.pruning.sequential`) runs on it; the tensors outside the layers are loaded only
to record the first layer's inputs, then put back on the meta device, so peak memory is one layer and the
calibration activations. Every file is opened for one read and closed again, so pages of the
memory-mapped checkpoint do not stay resident.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> dict:
    """``{tensor name: file}`` of a safetensors checkpoint folder (one file, or shards with an index)."""
    if (model_dir / INDEX).is_file():
        weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    if (model_dir / SINGLE).is_file():
        with safe_open(model_dir / SINGLE, "pt", device="cpu") as f:
            return dict.fromkeys(f.keys(), model_dir / SINGLE)
    present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise FileNotFoundError(f"{model_dir} holds no {SINGLE} or {INDEX} (it has {present[:8]}); sequential pruning "
                            "reads "
                            "safetensors checkpoints: load the model once and save_pretrained it, or use the "
                            "in-memory path (--no-sequential)")


def read_tensors(files: dict, names: list) -> dict:
    """``{name: tensor}`` for ``names`` (keys of :func:`checkpoint_files`), each file opened once and closed."""
    by_file: dict = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, group in by_file.items():
        with safe_open(path, "pt", device="cpu") as f:
            for name in group:
                out[name] = f.get_tensor(name)
    return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules in ``dtype`` as ``from_pretrained(dtype=...)`` does (buffers computed in float stay float)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def resolve_dtype(config, dtype) -> torch.dtype:
    """``dtype`` (a torch dtype, its name, ``None`` or ``"auto"``: the checkpoint's ``config.dtype``, else float32)."""
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"dtype={dtype!r}; give a floating torch dtype: float32, bfloat16, float16 or auto")
        dtype = value
    return dtype


class LazyModel:
    """``model`` built on the meta device from ``model_dir``'s config, with every tensor outside ``layers`` (a
    ModuleList of it) loaded by :meth:`load_rest`, and each layer loaded on demand by :meth:`load_layer`.

    ``model_class``: a transformers model class or auto class (default: the config's ``architectures[0]``).
    """

    def __init__(self, model_dir, dtype=None, model_class=None, device=None):
        import transformers
        from accelerate import init_empty_weights

        self.dir = Path(model_dir)
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if not self.dir.is_dir():
            raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist (sequential pruning reads a "
                                    "saved checkpoint folder)")
        self.files = checkpoint_files(self.dir)
        config = transformers.AutoConfig.from_pretrained(self.dir)
        self.dtype = resolve_dtype(config, dtype)
        if model_class is None:
            names = getattr(config, "architectures", None) or []
            model_class = getattr(transformers, names[0], None) if names else None
            model_class = model_class or transformers.AutoModel
        with init_empty_weights(), _default_dtype(self.dtype):
            build = getattr(model_class, "from_config", None)
            self.model = build(config) if build is not None and model_class.__name__.startswith("Auto") \
                else model_class(config)
        self.model.tie_weights()  # accelerate's meta init leaves tied weights apart: parameter counts would double
        self.model.eval()
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.keys = self._key_map()

    def _key_map(self) -> dict:
        """``{model state key: checkpoint tensor name}``: as saved, or with/without the base model prefix (a base
        model's checkpoint loaded with a head, or the reverse)."""
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        out = {}
        for key in self.model.state_dict():
            candidates = [key]
            if prefix and key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1:])
            elif prefix:
                candidates.append(f"{prefix}.{key}")
            found = next((c for c in candidates if c in self.files), None)
            if found is not None:
                out[key] = found
        return out

    def prefix(self, layers: nn.ModuleList, index: int) -> str:
        """State-dict prefix of ``layers[index]``, e.g. ``model.layers.3.``."""
        return f"{self.names[id(layers)]}.{index}."

    def rest_keys(self, layers: nn.ModuleList) -> list:
        """The model's state keys outside ``layers`` that the checkpoint holds. A key it lacks is refused unless the
        model ties it to the input embeddings (``save_pretrained`` leaves those out too)."""
        stack = self.names[id(layers)] + "."
        keys = [k for k in self.model.state_dict() if not k.startswith(stack)]
        tied = self._tied()
        missing = [k for k in keys if k not in self.keys and k not in tied]
        if missing:
            raise ValueError(f"{self.dir} has no tensor for {missing[:4]} (a head {type(self.model).__name__} adds?); "
                             "sequential pruning keeps the checkpoint's own weights: save the model with that head "
                             "first, or use the in-memory path (--no-sequential)")
        return [k for k in keys if k in self.keys]

    def _tied(self) -> set:
        if not getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            return set()
        out = self.model.get_output_embeddings()
        return {f"{self.names[id(out)]}.weight"} if out is not None else set()

    def load_rest(self, layers: nn.ModuleList) -> None:
        """Load the tensors outside ``layers`` into the model (the embeddings the first layer's inputs need); an
        untied output head is left out, since no pass goes past the first layer's input."""
        from accelerate.utils import set_module_tensor_to_device

        head = self.model.get_output_embeddings()
        skip = set() if head is None or head.weight is self.model.get_input_embeddings().weight else \
            {f"{self.names[id(head)]}.weight"}
        keys = [k for k in self.rest_keys(layers) if k not in skip]
        tensors = read_tensors(self.files, [self.keys[k] for k in keys])
        for key in keys:
            set_module_tensor_to_device(self.model, key, self.device, value=tensors.pop(self.keys[key]),
                                        dtype=self.dtype)
        self.model.tie_weights()  # the loaded embeddings replaced the tied parameter

    def unload_rest(self) -> None:
        """Put the loaded tensors back on the meta device: once the first layer's inputs are recorded, the layer
        passes need neither the embeddings nor anything else outside the layers."""
        self.model.to("meta")
        self.model.tie_weights()  # .to() gives each module its own copy of a shared parameter

    def rest_tensors(self, layers: nn.ModuleList):
        """``(state key, tensor)`` outside ``layers``, read from the checkpoint in the model's dtype one at a time
        (each file opened for one tensor), so a caller that writes and drops each holds one, not the embeddings and
        the head together."""
        for key in self.rest_keys(layers):
            yield key, _cast(read_tensors(self.files, [self.keys[key]])[self.keys[key]], self.dtype)

    def load_layer(self, layers: nn.ModuleList, index: int) -> nn.Module:
        """A copy of ``layers[index]`` with its weights read from the checkpoint onto the compute device (a GPU
        when there is one); the model's own layer stays on the meta device."""
        from accelerate.utils import set_module_tensor_to_device

        layer = copy.deepcopy(layers[index])
        prefix = self.prefix(layers, index)
        names = list(layer.state_dict())
        missing = [prefix + n for n in names if prefix + n not in self.keys]
        if missing:
            raise ValueError(f"{self.dir} has no tensor for {missing[:4]}; was it saved by another version of "
                             f"{type(self.model).__name__}? Load and save_pretrained it once")
        tensors = read_tensors(self.files, [self.keys[prefix + n] for n in names])
        for name in names:
            set_module_tensor_to_device(layer, name, self.device, value=tensors.pop(self.keys[prefix + name]),
                                        dtype=self.dtype)
        for name, buffer in list(layer.named_buffers()):  # non-persistent buffers were built on the CPU
            if buffer.device != self.device:
                set_module_tensor_to_device(layer, name, self.device, value=buffer)
        return layer


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def return_freed_memory() -> None:
    """Give the memory freed by the layer just done back to the operating system. glibc's malloc keeps freed heap
    memory for reuse, and over many layers of differently sized temporaries the process's resident memory grows
    with depth although no layer holds more (measured on 22 TinyLlama-shaped layers, recovery none: peak 1.34 GiB
    without this, 1.06 GiB with glibc told to return everything, as much as 2 layers take). No-op without glibc."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
            _TRIM = None
    return _TRIM


_TRIM = False  # not looked up yet

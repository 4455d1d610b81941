# Copyright hfprune contributors. Apache-2.0.
"""Precomputed teacher logits: run the teacher once, keep its top-k logits on disk, train without it in memory.

Format (a folder, written through :class:`~hfprune.core.checkpoint.transaction.Transaction`, so an interrupted write
leaves the previous store as it was; safetensors and JSON only)::

    teacher_logits.json                    format, version, top_k, temperature, dtype, vocab_size, rows, tokens,
                                           shards: [{"file", "rows": [first, end)}]
    teacher-logits-00000.safetensors       per shard, the rows' real tokens concatenated:
        values     (N, k) float16 / bfloat16 / float32   the teacher's k largest logits, raw (not divided by T)
        indices    (N, k) int32                          their token ids
        lse        (N,)   float32                        logsumexp(logits / T) over the whole vocabulary
        input_ids  (N,)   int32                          the tokens, to check the training rows are the same
        offsets    (R + 1,) int64                        row r is [offsets[r], offsets[r + 1])

A row's tokens are the positions its ``attention_mask`` marks (all positions without one), in order: right or left
padding at training time lines up with them. With ``lse`` the top-k tokens keep their true probabilities, so the
loss is :func:`~hfprune.distill.losses.topk_kl_per_item` (top-k plus a remainder bucket); ``lse`` depends on the
temperature, which therefore must be the training one. Each row costs ``k * (2 + 4) + 8`` bytes per token in fp16:
about 1.5 kB at k = 256 against 98 kB for SmolLM2's full fp16 logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..core.checkpoint.transaction import Transaction, check_target
from ..version import __version__
from .losses import teacher_topk

logger = logging.get_logger(__name__)

INDEX_FILE = "teacher_logits.json"
FORMAT = "hfprune-teacher-logits"
VERSION = 1
SHARD = "teacher-logits-{:05d}.safetensors"
_SHARD_NAME = re.compile(r"teacher-logits-\d{5}\.safetensors")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROW_KEY = "hfprune_teacher_row"  # the dataset row a training example came from, collated away
BATCH_KEYS = ("teacher_topk_values", "teacher_topk_indices", "teacher_lse")


@torch.no_grad()
def precompute_teacher_logits(teacher: torch.nn.Module, dataset, output_dir, top_k: int, temperature: float = 2.0,
                              batch_size: int = 8, dtype: str = "float16", collate_fn=None,
                              shard_tokens: int = 262144) -> Path:
    """Run ``teacher`` once over ``dataset`` and write its top-k logits to ``output_dir`` (format: module docstring).

    Args:
        teacher: the model whose logits are kept; it runs in eval mode, without gradients, on its own device.
        dataset: rows with ``input_ids`` (and optionally ``attention_mask``), in the order training will index them
            (a ``datasets.Dataset``, a list of dicts, any map-style dataset).
        output_dir: the folder; other files in it stay, a previous store there is replaced.
        top_k: tokens kept per position, ``1 <= top_k <= vocabulary size``.
        temperature: the distillation temperature (stored; training must use the same; 2.0 like
            ``DistillationConfig``).
        batch_size: rows per teacher forward pass.
        dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` for the logit values.
        collate_fn: turns a list of rows into a batch (default: right-pad ``input_ids`` with 0, with an
            ``attention_mask``); only ``input_ids`` and ``attention_mask`` reach the teacher.
        shard_tokens: tokens per safetensors shard.

    Returns the folder. Train from it with ``DistillationTrainer(teacher=None, teacher_logits=output_dir, ...)`` on
    the same dataset.

    Example:

    ```python
    >>> import tempfile, torch, transformers as T
    >>> from hfprune.distill.logits_store import TeacherLogitsStore, precompute_teacher_logits
    >>> teacher = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> rows = [{"input_ids": [1, 5, 7, 9]}, {"input_ids": [1, 4]}]
    >>> store = TeacherLogitsStore(precompute_teacher_logits(teacher, rows, tempfile.mkdtemp(), top_k=8))
    >>> store.row(1)["values"].shape, store.row(1)["values"].dtype
    (torch.Size([2, 8]), torch.float16)
    ```
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive int")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be a number > 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    vocab = vocab_size(teacher)
    if vocab is not None and top_k > vocab:
        raise ValueError(f"top_k={top_k} is more than the teacher's vocabulary of {vocab}")
    n_rows = len(dataset)
    if n_rows == 0:
        raise ValueError("the dataset is empty: nothing to precompute")
    check_target(output_dir)
    collate_fn = collate_fn or pad_right
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    store_dtype = DTYPES[dtype]
    old = _previous_shards(Path(output_dir))
    try:
        txn = Transaction(output_dir)
        with txn as staging:
            shards, pending, first, tokens = [], [], 0, 0
            for start in tqdm(range(0, n_rows, batch_size), desc="teacher logits", leave=False):
                rows = [dataset[i] for i in range(start, min(start + batch_size, n_rows))]
                batch = collate_fn(rows)
                ids = torch.as_tensor(batch["input_ids"])
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
                inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                logits = teacher(**inputs).logits  # (B, T, V)
                if logits.shape[-1] < top_k:
                    raise ValueError(f"top_k={top_k} is more than the teacher's vocabulary of {logits.shape[-1]}")
                values, indices, lse = teacher_topk(logits, top_k, temperature)
                keep = mask.bool()
                for b in range(ids.shape[0]):
                    real = keep[b]
                    pending.append({"values": values[b][real.to(values.device)].to("cpu", store_dtype),
                                    "indices": indices[b][real.to(indices.device)].to("cpu", torch.int32),
                                    "lse": lse[b][real.to(lse.device)].to("cpu", torch.float32),
                                    "input_ids": ids[b][real].to(torch.int32)})
                    tokens += int(real.sum())
                if sum(len(r["lse"]) for r in pending) >= shard_tokens:
                    shards.append(_write_shard(save_file, staging, len(shards), pending, first))
                    first += len(pending)
                    pending = []
            if pending:
                shards.append(_write_shard(save_file, staging, len(shards), pending, first))
            index = {"format": FORMAT, "version": VERSION, "hfprune_version": __version__, "top_k": top_k,
                     "temperature": float(temperature), "dtype": dtype, "vocab_size": int(logits.shape[-1]),
                     "rows": n_rows, "tokens": tokens, "shards": shards}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
            written = {s["file"] for s in shards}
            txn.superseded += [name for name in old if name not in written]  # an earlier store's extra shards
    finally:
        teacher.train(was_training)
    return Path(output_dir)


def _write_shard(save_file, staging: Path, number: int, rows: list, first: int) -> dict:
    lengths = torch.tensor([0] + [len(r["lse"]) for r in rows], dtype=torch.int64)
    tensors = {key: torch.cat([r[key] for r in rows]).contiguous()
               for key in ("values", "indices", "lse", "input_ids")}
    tensors["offsets"] = lengths.cumsum(0)
    name = SHARD.format(number)
    save_file(tensors, str(staging / name), metadata={"format": FORMAT, "first_row": str(first)})
    return {"file": name, "rows": [first, first + len(rows)]}


def _previous_shards(directory: Path) -> list:
    """Shard names listed by a store already in ``directory`` (hfprune wrote them; nothing else is removed)."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text())
        return [s["file"] for s in index["shards"] if isinstance(s.get("file"), str)
                and _SHARD_NAME.fullmatch(s["file"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def pad_right(rows: list) -> dict:
    """Right-pad ``input_ids`` (with 0) and ``attention_mask`` of ``rows`` into (B, T) tensors."""
    ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
    masks = [torch.as_tensor(r["attention_mask"], dtype=torch.long).reshape(-1) if r.get("attention_mask") is not None
             else torch.ones_like(i) for r, i in zip(rows, ids)]
    length = max(len(i) for i in ids)
    out_ids = torch.zeros(len(rows), length, dtype=torch.long)
    out_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (i, m) in enumerate(zip(ids, masks)):
        out_ids[b, : len(i)] = i
        out_mask[b, : len(m)] = m
    return {"input_ids": out_ids, "attention_mask": out_mask}


def vocab_size(model) -> int | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


class TeacherLogitsStore:
    """Read a folder written by :func:`precompute_teacher_logits`; ``row(i)`` gives row ``i``'s tensors.

    Shards are opened lazily (memory-mapped by safetensors) in each process, so DataLoader workers can share it.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no precomputed teacher logits ({INDEX_FILE} is missing); "
                                    "write them with hfprune.distill.precompute_teacher_logits")
        try:
            index = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{path} is not a teacher-logits index (format {FORMAT!r})")
        if index.get("version") != VERSION:
            raise ValueError(f"{path} has format version {index.get('version')!r}; this hfprune reads {VERSION}")
        self.index = index
        self.top_k, self.temperature = int(index["top_k"]), float(index["temperature"])
        self.vocab_size, self.num_rows = int(index["vocab_size"]), int(index["rows"])
        self.dtype = DTYPES[index["dtype"]]
        self._shards = [(int(s["rows"][0]), int(s["rows"][1]), s["file"]) for s in index["shards"]]
        self._handles: dict = {}
        self._offsets: dict = {}

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # safetensors handles do not travel to other processes: reopen there
        return {**self.__dict__, "_handles": {}, "_offsets": {}}

    def row(self, i: int) -> dict:
        """``values`` (L, k), ``indices`` (L, k) int32, ``lse`` (L,) float32, ``input_ids`` (L,) int32."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} is outside the {self.num_rows} rows of {self.directory}")
        found = next(((first, name) for first, end, name in self._shards if first <= i < end), None)
        if found is None:
            raise ValueError(f"{self.directory / INDEX_FILE} lists no shard for row {i}")
        first, name = found
        handle, offsets = self._open(name)
        a, b = int(offsets[i - first]), int(offsets[i - first + 1])
        return {key: handle.get_slice(key)[a:b] for key in ("values", "indices", "lse", "input_ids")}

    def _open(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / name), framework="pt")
            self._handles[name], self._offsets[name] = handle, handle.get_tensor("offsets")
        return self._handles[name], self._offsets[name]


class TeacherLogitsDataset(torch.utils.data.Dataset):
    """``dataset`` with each row's index added (``hfprune_teacher_row``), for :class:`TeacherLogitsCollator`."""

    def __init__(self, dataset, store: TeacherLogitsStore):
        if len(dataset) != len(store):
            raise ValueError(f"the training dataset has {len(dataset)} rows but the precomputed teacher logits in "
                             f"{store.directory} have {len(store)}: precompute them on this dataset")
        self.dataset, self.store = dataset, store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], ROW_KEY: int(i)}


class TeacherLogitsCollator:
    """Collate with ``collator``, then add the rows' teacher top-k, aligned with the batch's real tokens.

    Adds ``teacher_topk_values`` (B, T, k), ``teacher_topk_indices`` (B, T, k) and ``teacher_lse`` (B, T); padded
    positions hold zeros (the loss masks them). Rows without ``hfprune_teacher_row`` (evaluation) pass through.
    Raises when a row's tokens differ from the ones the teacher saw.
    """

    def __init__(self, collator, store: TeacherLogitsStore):
        self.collator, self.store = collator, store

    def __call__(self, features: list) -> dict:
        rows = [f.get(ROW_KEY) if isinstance(f, dict) else None for f in features]
        features = [{k: v for k, v in f.items() if k != ROW_KEY} if isinstance(f, dict) else f for f in features]
        batch = self.collator(features)
        if all(r is None for r in rows):
            return batch
        if any(r is None for r in rows):
            raise ValueError("a batch mixes rows with and without precomputed teacher logits")
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        (n, length), k = ids.shape, self.store.top_k
        values = torch.zeros(n, length, k, dtype=self.store.dtype)
        indices = torch.zeros(n, length, k, dtype=torch.int32)
        lse = torch.zeros(n, length, dtype=torch.float32)
        for b, r in enumerate(rows):
            rec = self.store.row(int(r))
            pos = keep[b].nonzero().squeeze(-1)
            if len(pos) != len(rec["input_ids"]) or not torch.equal(ids[b, pos].to(torch.int32), rec["input_ids"]):
                raise ValueError(f"row {r}: its tokens differ from those the teacher's logits in "
                                 f"{self.store.directory} were computed on; precompute them on this dataset, with "
                                 "the same tokenisation and truncation")
            values[b, pos], indices[b, pos], lse[b, pos] = rec["values"], rec["indices"], rec["lse"]
        batch.update(zip(BATCH_KEYS, (values, indices, lse)))
        return batch

# Copyright hfprune contributors. Apache-2.0.
"""Saving sparse models: an ordinary checkpoint with zeros in place (stock transformers loads it), or compact
(bit mask plus kept values per sparse weight, see :mod:`hfprune.core.checkpoint.sparse`), which
``hfprune.from_pretrained`` decompresses. Both write ``sparsity_plan.json`` and go through the staged, atomic
:class:`~hfprune.core.checkpoint.transaction.Transaction`."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ...core.apply import unwrap
from ...core.checkpoint.save import stage_checkpoint, weight_names
from ...core.checkpoint.sparse import SPARSITY_FILE, compress_tensors
from ...core.checkpoint.transaction import Transaction
from .oneshot import PLAN_ATTRIBUTE
from .targets import SparsityPlan, find_targets, plan_from_weights

INDEX_FILE = "model.safetensors.index.json"


def current_plan(model: nn.Module) -> SparsityPlan:
    """The plan :func:`~hfprune.sparsify` (or :class:`SparsityCallback`) left on ``model``, with the sparsity the
    weights have now; a model without one gets the plan of its block projections' zeros."""
    target = unwrap(model)
    plan = getattr(target, PLAN_ATTRIBUTE, None)
    targets = find_targets(target, "blocks+head" if plan and any(v == "head" for v in plan.layers.values())
                           else "blocks")
    if plan is not None:
        names = set(plan.weights)
        targets = [t for t in targets if t.name in names]
        pattern = next(iter(plan.weights.values()))["pattern"] if plan.weights else "unstructured"
        return plan_from_weights(targets, pattern, plan.config)
    return plan_from_weights(targets, "unstructured")


def save_sparse(model: nn.Module, save_directory, compact: bool = False, **kwargs) -> SparsityPlan:
    """Save ``model`` (sparsified) into ``save_directory`` with ``sparsity_plan.json``; returns the plan.

    ``compact=False``: the ordinary checkpoint ``save_pretrained`` writes, zeros in place, loadable by stock
    transformers. ``compact=True``: each planned weight is stored as a packed bit mask plus its kept values (about
    ``(1 - sparsity) + 1/32`` of the float32 size); load it with ``hfprune.from_pretrained``. ``kwargs`` go to
    ``save_pretrained`` (``max_shard_size``, ``safe_serialization``...). Other files in the folder stay.

    Example:

    ```python
    >>> import hfprune
    >>> hfprune.save_sparse(model, "smollm2-2of4", compact=True)  # doctest: +SKIP
    >>> model = hfprune.from_pretrained("smollm2-2of4")  # doctest: +SKIP
    ```
    """
    target = unwrap(model)
    plan = current_plan(target)
    txn = Transaction(save_directory, weights=weight_names(target, kwargs.get("variant")))
    if not kwargs.get("is_main_process", True):
        return plan
    with txn:
        stage_checkpoint(target, txn, **kwargs)
        if compact:
            _compact(txn.staging, set(plan.weights))
        (txn.staging / SPARSITY_FILE).write_text(json.dumps({"compact": bool(compact), **plan.to_dict()},
                                                            indent=1, sort_keys=True) + "\n")
    return plan


def _compact(staging: Path, names: set) -> None:
    """Rewrite the staged weight files with the planned weights in compact form (the index follows)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    index_path = staging / INDEX_FILE
    files = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) if index_path.is_file() \
        else ["model.safetensors"]
    if not (staging / files[0]).is_file():
        raise ValueError("compact=True needs safetensors weights (model.safetensors or its shards); a variant or "
                         "adapter save is not supported")
    found, renamed = 0, {}
    for name in files:
        path = staging / name
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        present = names & set(tensors)
        found += len(present)
        out = compress_tensors(tensors, present)
        renamed.update({key: name for key in out})
        save_file(out, str(path), metadata={**metadata, "hfprune_sparse": "bitmask"})
    if not found and names:
        raise ValueError(f"none of the {len(names)} sparse weights is in the saved files; nothing to compact")
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(renamed.items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

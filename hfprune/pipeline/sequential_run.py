# Copyright hfprune contributors. Apache-2.0.
"""``hfprune prune`` layer by layer: which path runs (:func:`choose_path`), and the run itself
(:func:`run_sequential`): calibration batches from the recipe's data,
:func:`hfprune.pruning.sequential.prune_sequential` into the output folder, with the tokenizer, the recipe and the
results beside the checkpoint in the same save.

The sequential run never holds the dense model, so it does not evaluate or time it (the in-memory run does both);
its results record parameters and MACs before and after, the plan and the time taken.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

logger = logging.getLogger("hfprune")

# The in-memory run holds the dense model, a copy for timing and the pruned model: it is chosen while the weights
# take less than this share of the memory left to the process.
IN_MEMORY_SHARE = 0.25


def weight_bytes(model_dir) -> int:
    """Bytes of the weight files in ``model_dir`` (safetensors or PyTorch), 0 if it has none."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))


def available_memory() -> int | None:
    """Bytes this process may still use: the least of the kernel's ``MemAvailable``, the address-space limit
    (``ulimit -v``) and the cgroup's limit; ``None`` when none is readable."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(soft)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def choose_path(requested: bool | None, config, model_dir, names=("--sequential", "--no-sequential")) -> tuple:
    """``(sequential, reason)``. ``requested``: ``--sequential`` (True), ``--no-sequential`` (False) or neither
    (None: layer by layer when the criterion, recovery and budget allow it and the dense weights would not fit the
    in-memory run comfortably). A forced ``--sequential`` the settings do not allow is a ``ValueError``.
    ``names``: how the reason and the error call the two choices (the command-line flags, or recipe keys)."""
    from ..pruning.sequential import sequential_problem
    from ..pruning.sparsity.config import SparsityConfig
    from ..pruning.sparsity.sequential import sparsity_problem

    # hfprune sparsify asks too: a SparsityConfig has its own list of what runs layer by layer
    problem = sparsity_problem(config) if isinstance(config, SparsityConfig) else sequential_problem(config)
    if requested is False:
        return False, names[1]
    if requested:
        if problem:
            raise ValueError(f"{names[0]}: {problem}")
        return True, names[0]
    if problem:
        return False, problem
    size, free = weight_bytes(model_dir), available_memory()
    if free is not None and size > IN_MEMORY_SHARE * free:
        return True, (f"the weights ({size / 2**30:.2f} GiB) take more than {IN_MEMORY_SHARE:.0%} of the memory left "
                      f"to this process ({free / 2**30:.2f} GiB)")
    return False, (f"the weights ({size / 2**30:.2f} GiB) fit in memory; {names[0]} prunes layer by layer anyway")


def recipe_choice(recipe, model_dir, save: bool = True) -> bool:
    """Whether :func:`hfprune.pipeline.run.run` prunes ``recipe`` layer by layer: :func:`choose_path` for its
    ``model`` section, ``model.sequential`` (true, false or null), where a ``model.dtype`` or ``model.offload_dir``
    with ``sequential: null`` means true, as ``--dtype`` and ``--offload_dir`` do on the command line. Logs which
    path and why. The layer-by-layer run writes as it goes, so a run that does not ``save`` stays in memory;
    ``method: gradual`` trains in memory."""
    m = recipe.model
    layerwise_only = m.dtype is not None or m.offload_dir is not None
    if recipe.method != "oneshot":
        if m.sequential or layerwise_only:
            raise ValueError(f"model.sequential, model.dtype and model.offload_dir apply to method oneshot; this "
                             f"recipe is {recipe.method} (it trains the model in memory)")
        return False
    requested = True if m.sequential is None and layerwise_only else m.sequential
    names = ("model.sequential: true" if m.sequential else "model.dtype / model.offload_dir (layer by layer only)",
             "model.sequential: false")
    sequential, why = choose_path(requested, recipe.pruning, model_dir, names)
    if sequential and not save:
        if requested:
            raise ValueError(f"{names[0]}: the layer-by-layer path writes the checkpoint as it goes; run it with "
                             "saving on")
        sequential, why = False, f"this run does not save, and the layer-by-layer path writes as it goes ({why})"
    logger.info("%s path: %s", "layer-by-layer" if sequential else "in-memory", why)
    return sequential


def check_options(dtype=None, offload_dir=None) -> None:
    """Refuse a ``dtype`` that is not a floating torch dtype and an ``offload_dir`` that is not a writable folder,
    naming them, before any data or model is read."""
    if offload_dir is not None:
        from ..pruning.seqio import check_writable

        check_writable(offload_dir)
    if dtype not in (None, "auto"):
        from ..pruning.lazy import resolve_dtype

        resolve_dtype(None, dtype)


def prune_recipe(recipe, path, tokenizer, calibration, *, dtype=None, offload_dir=None):
    """Prune the model in ``path`` layer by layer into ``recipe``'s output folder, with the tokenizer, the recipe and
    the results in the same save; ``calibration``: model-ready batches (``None`` for a data-free criterion). Returns
    the :class:`~hfprune.pruning.oneshot.PruneResult` (:func:`hfprune.pipeline.run.run_sequential` reads the
    recipe's data first)."""
    from ..pruning.sequential import prune_sequential
    from .artifacts import RECIPE_FILE, layer_rows, write_results

    def stage(folder: Path, result) -> None:  # into the same save: nothing looks finished before all is written
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / RECIPE_FILE).write_text(recipe.to_yaml())
        write_results(folder, {
            "recipe": recipe.name, "method": "oneshot", "path": "sequential", "task": recipe.model.task,
            "model_type": result.model.config.model_type, "base_model_dir": str(path),
            "pruning": recipe.pruning.to_dict(), "recovery": result.recovery, "metrics": {"before": {}, "after": {}},
            "params": {"before": result.before.params, "after": result.after.params},
            "macs": {"before": result.before.macs, "after": result.after.macs, "seq_len": recipe.pruning.seq_len},
            "layers": layer_rows(result.before, result.after, result.plan), "seconds": result.seconds})

    result = prune_sequential(path, calibration, recipe.pruning, recipe.output_dir, dtype=dtype,
                              offload_dir=offload_dir, stage=stage)
    logger.info("saved to %s", recipe.output_dir)
    return result

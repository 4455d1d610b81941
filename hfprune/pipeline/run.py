# Copyright hfprune contributors. Apache-2.0.
"""Run a recipe end to end: model and data, an optional cached fine-tune, one-shot or gradual pruning (with
distillation), evaluation and latency before/after, an atomic save with model card and plots, an optional push.

``hfprune run RECIPE`` calls :func:`run`. What differs by task (the model class, tokenizer, data preparation,
evaluation, the latency input) is the task's (:mod:`hfprune.pipeline.tasks`); the functions below that take a
recipe hand over to it. File names and the results schema are in :mod:`hfprune.pipeline.artifacts`; the sweep over
budgets is :mod:`hfprune.pipeline.sweep`.
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.plan import hub_id
from ..pruning.latency import time_models
from .artifacts import (  # noqa: F401  (RESULTS_FILE, sweep_table, ...: hfprune.run's names before the split)
    CARD_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    SCORES_FILE,
    layer_rows,
    read_results,
    results_table,
    scores_to_tensors,
    sweep_table,
    write_results,
)
from .evaluation import eval_record, evaluate_model, f1_average, hardware, latency_input, metric_label  # noqa: F401
from .finetune_cache import cache_key, files_digest, finetune_settings, model_digest  # noqa: F401
from .recipe import Recipe
from .run_output import save_run
from .specs import DataSpec
from .tasks import get_task, load_class_from_config  # noqa: F401  (load_class_from_config: an old hfprune.run name)

logger = logging.getLogger("hfprune")

ASSET_MODELS = {"minilm": "hfprune.data.assets:minilm_dir", "movie-review-teacher":
                "hfprune.data.teachers:movie_review_teacher"}


# ---- Model and data ---------------------------------------------------------------------------------------------


def import_object(spec: str, root: Path | None = None):
    """``"package.module:name"`` -> the object. With ``root`` (a recipe's folder), a module there imports too: the
    folder is first on ``sys.path`` for this import only, as a script's own folder is for the script."""
    module, _, name = spec.partition(":")
    entry = None if root is None else str(root)
    if entry is not None:
        sys.path.insert(0, entry)
        importlib.invalidate_caches()  # a module written since the last import in this process
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        where = f" (looked in the recipe's folder {entry} and on sys.path)" if entry is not None else ""
        raise ValueError(f"cannot import {spec!r}: {err}{where}") from None
    finally:
        if entry is not None:  # this entry only: the imported module may have changed sys.path on purpose
            index = next((i for i, p in enumerate(sys.path) if p is entry), None)
            if index is not None:
                del sys.path[index]


def resolve_model_path(recipe: Recipe) -> Path:
    """The directory the dense model loads from: a fine-tuned (cached) model when the recipe has a finetune
    stage, else ``model.path`` (a directory, ``asset:<name>`` or ``package.module:function``). The run and the
    sweep call it first, so a missing data file is named here, before any model loads."""
    if recipe.data.loader == "files":
        for split in recipe.data.files:
            data_files(recipe.data, split, recipe.root)
    ft = recipe.finetune
    if ft is not None and ft.teacher == "movie_review":
        if recipe.model.path != "asset:minilm":
            raise ValueError("finetune.teacher: movie_review is all-MiniLM-L6-v2 fine-tuned; "
                             "set model.path: asset:minilm")
        from ..data.teachers import movie_review_teacher

        return movie_review_teacher()
    base = _model_source(recipe.model.path, recipe.root)
    if ft is not None:
        return finetune(recipe, base)
    return base


def _model_source(path: str, root: Path | None = None) -> Path:
    if path.startswith("asset:"):
        name = path[len("asset:"):]
        if name not in ASSET_MODELS:
            raise ValueError(f"model.path={path!r}: unknown asset; known: {sorted('asset:' + k for k in ASSET_MODELS)}")
        return Path(import_object(ASSET_MODELS[name])())
    if ":" in path and not Path(path).exists():
        return Path(import_object(path, root)())
    if not Path(path).is_dir():
        where = f" (a relative path in a recipe file is relative to its folder, {root})" if root is not None else ""
        raise ValueError(f"model.path={path!r} is not a directory (nor asset:<name> / package.module:function)"
                         f"{where}")
    return Path(path)


def load_model(recipe: Recipe, path: Path):
    """The recipe's model from ``path``, as its task loads it (:meth:`hfprune.pipeline.tasks.Task.load_model`)."""
    return get_task(recipe.model.task).load_model(path, recipe.model)


def load_tokenizer(recipe: Recipe, path: Path):
    """The tokenizer saved with the model, or ``None`` for a task without one (forecasting)."""
    return get_task(recipe.model.task).load_tokenizer(path)


def read_data(data: DataSpec, root: Path | None = None):
    """The recipe's ``DatasetDict`` as its loader returns it (``None`` for ``loader: none``), splits checked.
    ``root``: the recipe file's folder, where a ``package.module:function`` loader may live."""
    if data.loader == "none":
        return None
    if data.loader == "movie_reviews":
        from ..data import movie_reviews

        raw = movie_reviews(data.seed, **data.kwargs)
    elif data.loader == "files":
        import datasets

        for split in data.files:
            data_files(data, split, root)  # a missing file named here, not deep inside datasets
        raw = datasets.load_dataset(data.format, data_files=data.files, **data.kwargs)
    else:
        raw = import_object(data.loader, root)(seed=data.seed, **data.kwargs)
    for split in (data.train_split, data.eval_split):
        if split not in raw:
            raise ValueError(f"data: split {split!r} not in the loaded data; it has {sorted(raw)}")
    return raw


def data_files(data: DataSpec, split: str, root: Path | None = None) -> list:
    """The files ``data.files[split]`` names, glob patterns expanded (sorted); an error names a path that matches
    nothing."""
    paths = data.files[split]
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        pattern = any(c in path for c in "*?[")
        found = sorted(glob.glob(path, recursive=True)) if pattern else [path] if os.path.isfile(path) else []
        if not found:
            where = f" (a relative path in a recipe file is relative to its folder, {root})" if root else ""
            raise ValueError(f"data.files[{split!r}]: {path!r} " + ("matches no file" if pattern else "is not a file")
                             + where)
        out += found
    return out


def load_data(recipe: Recipe, tokenizer, raw=None, model=None):
    """The recipe's DatasetDict, prepared by its task (text tokenised, labels in ``labels``, other columns
    dropped), or ``None`` without data. ``raw``: the loader's DatasetDict when already read. ``model``: the loaded
    model, which the task reads (a forecaster's window lengths) and names (word labels into its config). What the
    recipe leaves to the data is settled here, in ``recipe.evaluation`` (MASE's season from the data's frequency)."""
    raw = read_data(recipe.data, recipe.root) if raw is None else raw
    if raw is None:
        return None
    task = get_task(recipe.model.task)
    recipe.evaluation = task.resolve_evaluation(raw, recipe.data, recipe.evaluation, model)
    return task.prepare_data(raw, tokenizer, recipe.data, model)


def collator(recipe: Recipe, tokenizer, model):
    return get_task(recipe.model.task).collator(tokenizer, model)


def subset(dataset, n: int | None, seed: int):
    return dataset if n is None or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def batches(dataset, collate, batch_size: int) -> list:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return list(loader)


# ---- Fine-tune stage --------------------------------------------------------------------------------------------


def train_data_digest(recipe: Recipe, raw=None) -> str:
    """What the fine-tune stage trains on, as a digest of contents (never of paths or names): the bytes of the
    train split's files for ``loader: files``, else the ``datasets`` fingerprint of the loaded train split
    (``raw``), which follows its contents and every transform on them."""
    d = recipe.data
    if d.loader == "files":
        return files_digest(data_files(d, d.train_split, recipe.root))
    return raw[d.train_split]._fingerprint


def _check_not_foreign(target: Path) -> None:
    """A cache folder without ``finetune.json`` is not a fine-tune hfprune wrote (those move in whole): never
    replace it."""
    if target.exists() and not (target / "finetune.json").is_file():
        raise FileExistsError(f"{target} exists and is not an hfprune fine-tune (no finetune.json): move it away")


def finetune(recipe: Recipe, base: Path) -> Path:
    """Fine-tune the dense model with ``finetune.training`` on the train split, cached by what shapes it
    (:func:`finetune_settings`): a second run, or another recipe with the same stage, reuses it; changed data,
    model files or training settings train anew."""
    from transformers import Trainer, TrainingArguments

    from ..data.assets import cache_dir

    raw = None if recipe.data.loader == "files" else read_data(recipe.data, recipe.root)
    settings = finetune_settings(recipe, base, train_data_digest(recipe, raw))
    key = cache_key(settings)
    target = cache_dir() / "finetuned" / key
    if (target / "finetune.json").is_file():
        logger.info("fine-tuned model cached at %s", target)
        return target
    _check_not_foreign(target)  # before minutes of training
    logger.info("fine-tuning the dense model (cached afterwards at %s)", target)
    tokenizer = load_tokenizer(recipe, base)
    model = load_model(recipe, base)
    data = load_data(recipe, tokenizer, raw, model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        args = TrainingArguments(output_dir=os.path.join(tmp, "run"), seed=recipe.seed,
                                 **{"save_strategy": "no", "report_to": [], **recipe.finetune.training})
        Trainer(model=model, args=args, train_dataset=data[recipe.data.train_split],
                data_collator=collator(recipe, tokenizer, model)).train()
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / "finetune.json").write_text(json.dumps(settings, indent=2, default=str))
        _check_not_foreign(target)
        shutil.rmtree(target, ignore_errors=True)  # a fine-tune of ours for the same key, written meanwhile
        os.replace(out, target)
    return target


# ---- The run ----------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run measured; ``results`` is what ``hfprune_results.json`` holds (the card and plots read it)."""

    results: dict
    output_dir: Path | None = None
    model: object = None
    scores: dict = field(default_factory=dict)

    def table(self) -> str:
        return results_table(self.results)

    def __str__(self) -> str:
        return self.table()


def _prune_gradual(recipe: Recipe, model, teacher, data, collate, out_dir: Path):
    from transformers import Trainer, TrainingArguments

    from ..pruning.callback import PruningCallback

    # A scratch folder this run creates (never a fixed name: removing it afterwards must not remove anything else)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{out_dir.name}.trainer-", dir=out_dir.parent)
    args = TrainingArguments(output_dir=scratch, seed=recipe.seed,
                             **{"save_strategy": "no", "report_to": [], **recipe.training})
    # Scores come from the training run itself (gate gradients, activations or weights: see PruningCallback),
    # which costs nothing extra; calibration batches would add a scoring pass at every pruning step.
    callback = PruningCallback(recipe.pruning, schedule=recipe.schedule)
    kwargs = dict(model=model, args=args, train_dataset=data[recipe.data.train_split], data_collator=collate,
                  callbacks=[callback])
    if recipe.data.validation_split and recipe.data.validation_split in data:
        kwargs["eval_dataset"] = data[recipe.data.validation_split]
    if recipe.distillation is not None:
        from ..distill import DistillationTrainer

        trainer = DistillationTrainer(teacher=teacher, distill_config=recipe.distillation, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return trainer.model


def run(recipe: Recipe, *, save: bool = True, push: bool | None = None) -> RunResult:
    """Run ``recipe``; returns the measurements (and writes the checkpoint, card and plots when ``save``)."""
    import transformers

    from ..core import cost
    from ..core.apply import unwrap
    from ..pruning.oneshot import prune

    start = time.perf_counter()
    transformers.set_seed(recipe.seed)
    path = resolve_model_path(recipe)
    logger.info("dense model: %s", path)
    from .sequential_run import recipe_choice

    if recipe_choice(recipe, path, save):  # the model section or its size says layer by layer (logged, with why)
        m = recipe.model
        result = run_sequential(recipe, dtype=m.dtype, offload_dir=m.offload_dir, path=path)
        out = RunResult(read_results(recipe.output_dir), recipe.output_dir, result.model, result.scores)
        _push(recipe, out, push)
        return out
    if recipe.model.dtype is not None or recipe.model.offload_dir is not None:
        raise ValueError("model.dtype and model.offload_dir apply to layer-by-layer pruning; set model.sequential "
                         "to true or null")
    tokenizer = load_tokenizer(recipe, path)
    model = load_model(recipe, path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    data = load_data(recipe, tokenizer, model=model)
    d, e = recipe.data, recipe.evaluation
    collate = collator(recipe, tokenizer, model) if data is not None else None
    calibration = eval_batches = None
    if data is not None:
        calibration = batches(subset(data[d.train_split], d.calibration_samples, recipe.seed), collate,
                              d.calibration_batch_size)
        eval_batches = batches(subset(data[d.eval_split], d.max_eval_samples, recipe.seed), collate, e.batch_size)
    metrics_before = evaluate_model(recipe, model, eval_batches) if eval_batches else {}
    logger.info("dense: %s", metrics_before)
    dense = copy.deepcopy(model)
    seq_len = recipe.pruning.seq_len
    cost_before = cost.estimate(model, seq_len=seq_len)
    scores, extra = {}, {}
    if recipe.method == "oneshot":
        result = prune(model, calibration, recipe.pruning)
        scores, extra["recovery"] = result.scores, result.recovery
    else:
        out = recipe.output_dir
        model = _prune_gradual(recipe, model, dense, data, collate, out)
    target = unwrap(model)
    plan = getattr(target, "hfprune_plan", None)
    if plan is None:
        raise RuntimeError("the model was not physically pruned (no hfprune_plan on it); nothing to save")
    cost_after = cost.estimate(target, seq_len=seq_len)
    metrics_after = evaluate_model(recipe, target, eval_batches) if eval_batches else {}
    logger.info("pruned: %s", metrics_after)
    results = {
        "hfprune_version": _version(), "recipe": recipe.name, "method": recipe.method, "task": recipe.model.task,
        # base_model(_id): a Hub id or None, for the card's metadata (of the resolved path: a relative one as
        # written could read as owner/name); model_path: where the dense model came from, as the recipe wrote it
        "base_model": hub_id(recipe.model.path), "model_path": (recipe.raw.get("model") or {}).get(
            "path", recipe.model.path),
        "base_model_id": recipe.model.base_model, "base_model_dir": str(path), "model_type": target.config.model_type,
        "dataset": d.loader, "eval": eval_record(recipe, target, eval_batches),
        "pruning": recipe.pruning.to_dict() if hasattr(recipe.pruning, "to_dict") else {},
        "distilled": recipe.distillation is not None,
        "metrics": {"before": metrics_before, "after": metrics_after},
        "params": {"before": cost_before.params, "after": cost_after.params},
        "macs": {"before": cost_before.macs, "after": cost_after.macs, "seq_len": seq_len},
        "layers": layer_rows(cost_before, cost_after, plan), **extra,
    }
    timing = latency_input(recipe, target, eval_batches or []) if e.latency else None
    if timing is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in timing.items()}
        times = time_models({"dense": dense, "pruned": target}, batch, e.latency_rounds)
        b, a = statistics.median(times["dense"]), statistics.median(times["pruned"])
        results["latency"] = {"before_ms": b, "after_ms": a, "speedup": b / a, "before_all_ms": times["dense"],
                              "after_all_ms": times["pruned"], "batch_size": e.latency_batch_size,
                              "seq_len": _length(batch), "rounds": e.latency_rounds, "hardware": hardware()}
    del dense
    results["seconds"] = time.perf_counter() - start
    out = RunResult(results, model=target, scores=scores)
    # Under accelerate launch / torchrun every process runs the recipe; only the first one writes and pushes.
    if save and int(os.environ.get("RANK", "0")) == 0:
        out.output_dir = save_run(recipe, target, tokenizer, results, scores)
        _push(recipe, out, push)
    return out


def _push(recipe: Recipe, out: RunResult, push: bool | None) -> None:
    if recipe.hub.push if push is None else push:
        from .hub import push_to_hub

        h = recipe.hub
        out.results["hub_url"] = push_to_hub(out.output_dir, h.repo_id, private=h.private, revision=h.revision,
                                             create_pr=h.create_pr)


def run_sequential(recipe: Recipe, *, dtype=None, offload_dir=None, path: Path | None = None):
    """Prune ``recipe``'s model layer by layer (:func:`hfprune.pipeline.sequential_run.prune_recipe`) on its
    calibration data; returns the :class:`~hfprune.pruning.oneshot.PruneResult`. ``path``: the dense model's
    folder when already resolved. The options, then the data (text shorter than one block), are checked before
    anything is written."""
    from .sequential_run import check_options, prune_recipe

    check_options(dtype, offload_dir)  # before the data are read, let alone the model
    path = resolve_model_path(recipe) if path is None else path
    tokenizer = load_tokenizer(recipe, path)
    data = load_data(recipe, tokenizer)
    calibration = None
    if data is not None:
        d = recipe.data
        calibration = batches(subset(data[d.train_split], d.calibration_samples, recipe.seed),
                              collator(recipe, tokenizer, None), d.calibration_batch_size)
    return prune_recipe(recipe, path, tokenizer, calibration, dtype=dtype, offload_dir=offload_dir)


def _length(batch: dict) -> int:
    """Tokens (or past time steps) per row of a timing batch."""
    return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[1]


def _version() -> str:
    from ..version import __version__

    return __version__


# Moved to hfprune.pipeline.sweep, which builds on this module (a re-export would be an import cycle).
MOVED_TO_SWEEP = ("sweep", "BUDGET_KEYS")


def __getattr__(name: str):
    if name in MOVED_TO_SWEEP:
        raise AttributeError(f"{name} moved from hfprune.run to hfprune.pipeline.sweep: "
                             f"from hfprune.pipeline.sweep import {name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Copyright hfprune contributors. Apache-2.0.
"""Run a recipe end to end: model and data, an optional cached fine-tune, one-shot or gradual pruning (with
distillation), evaluation and latency before/after, an atomic save with model card and plots, an optional push.

``hfprune run RECIPE`` calls :func:`run`; ``hfprune sweep RECIPE`` calls :func:`sweep`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..pruning.latency import time_models
from .recipe import Recipe

logger = logging.getLogger("hfprune")

RESULTS_FILE = "hfprune_results.json"
RECIPE_FILE = "recipe.yaml"
SCORES_FILE = "importance.safetensors"
SEQ2SEQ_FORECASTERS = ("time_series_transformer", "informer", "autoformer")
ASSET_MODELS = {"minilm": "hfprune.data.assets:minilm_dir", "movie-review-teacher":
                "hfprune.data.teachers:movie_review_teacher"}


# ---- Model and data ---------------------------------------------------------------------------------------------


def import_object(spec: str):
    """``"package.module:name"`` -> the object."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {spec!r}: {err}") from None


def resolve_model_path(recipe: Recipe) -> Path:
    """The directory the dense model loads from: a fine-tuned (cached) model when the recipe has a finetune
    stage, else ``model.path`` (a directory, ``asset:<name>`` or ``package.module:function``)."""
    ft = recipe.finetune
    if ft is not None and ft.teacher == "movie_review":
        if recipe.model.path != "asset:minilm":
            raise ValueError("finetune.teacher: movie_review is all-MiniLM-L6-v2 fine-tuned; "
                             "set model.path: asset:minilm")
        from ..data.teachers import movie_review_teacher

        return movie_review_teacher()
    base = _model_source(recipe.model.path)
    if ft is not None:
        return finetune(recipe, base)
    return base


def _model_source(path: str) -> Path:
    if path.startswith("asset:"):
        name = path[len("asset:"):]
        if name not in ASSET_MODELS:
            raise ValueError(f"model.path={path!r}: unknown asset; known: {sorted('asset:' + k for k in ASSET_MODELS)}")
        return Path(import_object(ASSET_MODELS[name])())
    if ":" in path and not Path(path).exists():
        return Path(import_object(path)())
    if not Path(path).is_dir():
        raise ValueError(f"model.path={path!r} is not a directory (nor asset:<name> / package.module:function)")
    return Path(path)


def load_model(recipe: Recipe, path: Path):
    """The recipe's model from ``path``. A checkpoint hfprune saved loads with :func:`hfprune.from_pretrained`,
    which rebuilds it with the installed hfprune: no code from the checkpoint runs, whatever
    ``model.trust_remote_code`` says (it only applies to other checkpoints)."""
    import transformers

    from ..core.checkpoint.load import from_pretrained, is_hfprune_checkpoint

    kwargs = {}
    if recipe.model.num_labels is not None:
        kwargs["num_labels"] = recipe.model.num_labels
    auto = {"text-classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM}.get(recipe.model.task)
    if is_hfprune_checkpoint(path):
        return from_pretrained(path, auto, **kwargs)  # forecasting (auto None): the saved head class
    kwargs["trust_remote_code"] = recipe.model.trust_remote_code
    if auto is not None:
        return auto.from_pretrained(path, **kwargs)
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)  # forecasting: the saved head class
    return load_class_from_config(config).from_pretrained(path, **kwargs)


def load_class_from_config(config):
    """The transformers class ``config.architectures`` names (the saved head class). Never a class from a
    checkpoint's code: hfprune's own checkpoints load with :func:`hfprune.from_pretrained`."""
    import transformers

    name = (config.architectures or [None])[0]
    if name is None:
        raise ValueError("the saved config names no class in `architectures`; cannot tell which head to load")
    if not hasattr(transformers, name):
        raise ValueError(f"config.architectures={config.architectures}: transformers {transformers.__version__} "
                         f"has no class {name}")
    return getattr(transformers, name)


def _hub_id(value) -> str | None:
    from ..core.plan import hub_id

    return hub_id(value)


def load_tokenizer(recipe: Recipe, path: Path):
    if recipe.model.task == "forecasting":
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder LMs ship without one; padding is masked out of every loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(recipe: Recipe, tokenizer):
    """The recipe's DatasetDict, tokenised for text tasks (labels in ``labels``), other columns dropped."""
    d = recipe.data
    if d.loader == "none":
        return None
    if d.loader == "movie_reviews":
        from ..data import movie_reviews

        raw = movie_reviews(d.seed, **d.kwargs)
    elif d.loader == "files":
        import datasets

        raw = datasets.load_dataset(d.format, data_files=d.files, **d.kwargs)
    else:
        raw = import_object(d.loader)(seed=d.seed, **d.kwargs)
    for split in (d.train_split, d.eval_split):
        if split not in raw:
            raise ValueError(f"data: split {split!r} not in the loaded data; it has {sorted(raw)}")
    if recipe.model.task == "forecasting" or tokenizer is None:
        return raw
    if d.text_column not in raw[d.train_split].column_names:
        return raw  # already tokenised by its loader

    def tokenize(batch):
        out = tokenizer(batch[d.text_column], truncation=True, max_length=d.max_length)
        if recipe.model.task == "text-classification":
            out["labels"] = batch[d.label_column]
        return out

    return raw.map(tokenize, batched=True, remove_columns=raw[d.train_split].column_names, desc="tokenise")


def collator(recipe: Recipe, tokenizer, model):
    import transformers

    if recipe.model.task == "text-classification":
        return transformers.DataCollatorWithPadding(tokenizer)
    if recipe.model.task == "causal-lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    from ..data.timeseries import ForecastCollator

    return ForecastCollator(model.config)


def subset(dataset, n: int | None, seed: int):
    return dataset if n is None or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def batches(dataset, collate, batch_size: int) -> list:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return list(loader)


# ---- Fine-tune stage --------------------------------------------------------------------------------------------


def finetune(recipe: Recipe, base: Path) -> Path:
    """Fine-tune the dense model with ``finetune.training`` on the train split, cached by every setting that
    shapes it (a second run, or another recipe with the same stage, reuses it)."""
    from transformers import Trainer, TrainingArguments

    from ..data.assets import cache_dir

    settings = {"model": str(base), "task": recipe.model.task, "num_labels": recipe.model.num_labels,
                "data": recipe.raw.get("data", {}), "training": recipe.finetune.training, "seed": recipe.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = cache_dir() / "finetuned" / f"{recipe.name}-{key}"
    if (target / "finetune.json").is_file():
        logger.info("fine-tuned model cached at %s", target)
        return target
    logger.info("fine-tuning the dense model (cached afterwards at %s)", target)
    tokenizer = load_tokenizer(recipe, base)
    model = load_model(recipe, base)
    data = load_data(recipe, tokenizer)
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
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    return target


# ---- Evaluation and latency -------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_model(recipe: Recipe, model, eval_batches: list) -> dict:
    """The recipe's metrics of ``model`` on ``eval_batches``, through hfprune's (local) evaluate modules."""
    from .. import metrics as hf_metrics
    from ..pruning.importance.base import iterate, to_device

    task = recipe.model.task
    context = getattr(model.config, "context_length", None)
    if task == "forecasting" and "mase" in recipe.evaluation.metrics and context is not None \
            and recipe.evaluation.periodicity >= context:
        raise ValueError(f"evaluation.periodicity={recipe.evaluation.periodicity} must be below the model's "
                         f"context_length={context}: MASE scales by the seasonal-naive error within the context")
    device = next(model.parameters()).device
    model.eval()
    # the same random stream for every model evaluated: Informer's ProbSparse attention samples keys in forward
    torch.manual_seed(recipe.seed)
    preds, refs, losses, counts, history = [], [], [], [], []
    for batch in iterate(eval_batches, "evaluate"):
        batch = to_device(dict(batch), device)
        if task == "causal-lm":
            from ..perplexity import nll_sum

            labels = batch.pop("labels")
            total, n = nll_sum(model(**batch, use_cache=False).logits, labels)
            losses.append(float(total) / max(n, 1))
            counts.append(n)
        elif task == "text-classification":
            labels = batch.pop("labels")
            preds += model(**batch).logits.argmax(-1).tolist()
            refs += labels.tolist()
        else:
            from ..forecast import channel_series, greedy_forecast, point_forecast

            # The model must not see the future: seq2seq families would read it through their lags (teacher
            # forcing), so they forecast greedily from the past alone.
            future = batch.pop("future_values")
            batch.pop("future_observed_mask", None)
            if model.config.model_type in SEQ2SEQ_FORECASTERS:
                pred = greedy_forecast(model, batch)
            else:
                pred = point_forecast(model(**batch))  # (B, H, C)
            # one series per window and channel; MASE scales each by the naive error of its own context
            preds += channel_series(pred).tolist()
            refs += channel_series(future).tolist()
            history += channel_series(batch["past_values"][:, -context:]).tolist()
    out = {}
    for name in recipe.evaluation.metrics:
        metric = hf_metrics.load(name)
        if task == "causal-lm":
            result = metric.compute(losses=losses, num_tokens=counts)
        elif name == "mase":
            result = metric.compute(predictions=preds, references=refs, training=history,
                                    periodicity=recipe.evaluation.periodicity)
        else:
            result = metric.compute(predictions=preds, references=refs)
        out.update({k: float(v) for k, v in result.items()})
    return out


def hardware() -> str:
    """The device latency is measured on, named for the model card: CPU model, cores, torch threads; or GPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from ..pruning.latency import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def latency_input(recipe: Recipe, model, eval_batches: list) -> dict:
    """A fixed-size batch for timing: random token ids of ``latency_batch_size`` x ``latency_seq_len`` for text
    (content does not change the work), the first evaluation rows repeated for forecasting."""
    e = recipe.evaluation
    if recipe.model.task == "forecasting":
        first = eval_batches[0]
        reps = -(-e.latency_batch_size // next(iter(first.values())).shape[0])
        return {k: torch.cat([v] * reps)[: e.latency_batch_size] if isinstance(v, torch.Tensor) else v
                for k, v in first.items()}
    g = torch.Generator().manual_seed(recipe.seed)
    ids = torch.randint(3, model.config.vocab_size, (e.latency_batch_size, e.latency_seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def results_table(r: dict) -> str:
    """The before/after markdown table: metrics, parameters, MACs and measured latency."""
    rows = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    split = r.get("eval", {}).get("split", "eval")
    for name, before in r["metrics"]["before"].items():
        after = r["metrics"]["after"].get(name)
        rows.append(f"| {split} {name} | {before:.4f} | {after:.4f} | |")
    p, m = r["params"], r["macs"]
    rows.append(f"| parameters | {p['before']:,} | {p['after']:,} | {_ratio(p['after'], p['before'])} |")
    rows.append(f"| MACs, transformer layers, seq {m['seq_len']} | {m['before']:,} | {m['after']:,} | "
                f"{_ratio(m['after'], m['before'])} |")
    lat = r.get("latency")
    if lat:
        rows.append(f"| latency, batch {lat['batch_size']} x {lat['seq_len']}, median of {lat['rounds']} | "
                    f"{lat['before_ms']:.1f} ms | {lat['after_ms']:.1f} ms | "
                    f"{_ratio(lat['after_ms'], lat['before_ms'])} |")
        rows.append(f"\nLatency measured on {lat['hardware']}; speedup {lat['speedup']:.2f}x.")
    return "\n".join(rows)


def layer_rows(before, after, plan) -> list:
    """Per layer: dense and kept heads/neurons (0 for a dropped layer), for the card and the plots."""
    kept = {(c.stack, c.index): c for c in after.layers}
    rows = []
    for c in before.layers:
        k = kept.get((c.stack, c.index))
        rows.append({"stack": c.stack, "index": c.index, "dropped": k is None,
                     "dense_heads": dict(c.heads), "heads": dict(k.heads) if k else {n: 0 for n in c.heads},
                     "dense_neurons": dict(c.neurons),
                     "neurons": dict(k.neurons) if k else {n: 0 for n in c.neurons}})
    return rows


def _prune_gradual(recipe: Recipe, model, teacher, data, collate, out_dir: Path):
    from transformers import Trainer, TrainingArguments

    from ..pruning.callback import PruningCallback

    args = TrainingArguments(output_dir=str(out_dir.parent / f".{out_dir.name}.trainer"), seed=recipe.seed,
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
    tokenizer = load_tokenizer(recipe, path)
    model = load_model(recipe, path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    data = load_data(recipe, tokenizer)
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
        # base_model(_id): a Hub id or None, for the card's metadata; model_path: where the dense model came from
        "base_model": _hub_id(recipe.model.path), "model_path": recipe.model.path,
        "base_model_id": recipe.model.base_model, "base_model_dir": str(path), "model_type": target.config.model_type,
        "dataset": d.loader, "eval": {"split": d.eval_split, "examples": sum(len(next(iter(b.values())))
                                                                           for b in eval_batches or [])},
        "pruning": recipe.pruning.to_dict() if hasattr(recipe.pruning, "to_dict") else {},
        "distilled": recipe.distillation is not None,
        "metrics": {"before": metrics_before, "after": metrics_after},
        "params": {"before": cost_before.params, "after": cost_after.params},
        "macs": {"before": cost_before.macs, "after": cost_after.macs, "seq_len": seq_len},
        "layers": layer_rows(cost_before, cost_after, plan), **extra,
    }
    if e.latency and (eval_batches or recipe.model.task != "forecasting"):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in latency_input(recipe, target, eval_batches or []).items()}
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
        do_push = recipe.hub.push if push is None else push
        if do_push:
            from .hub import push_to_hub

            h = recipe.hub
            results["hub_url"] = push_to_hub(out.output_dir, h.repo_id, private=h.private, revision=h.revision,
                                             create_pr=h.create_pr)
    return out


def _length(batch: dict) -> int:
    """Tokens (or past time steps) per row of a timing batch."""
    return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[1]


def _version() -> str:
    from ..version import __version__

    return __version__


def scores_to_tensors(scores: dict) -> dict:
    """``{(stack, i, block): tensor}`` -> ``{"stack.i.block": tensor}`` for safetensors."""
    return {f"{k[0]}.{k[1]}.{k[2]}": v.detach().float().cpu().contiguous() for k, v in scores.items()}


def save_run(recipe: Recipe, model, tokenizer, results: dict, scores: dict) -> Path:
    """Write checkpoint, tokenizer, results, recipe, importance scores, plots and card into the output folder as
    one transaction (``modeling.transaction``): a failed or killed run leaves the previous output as it was, and
    the folder's other files stay."""
    from safetensors.torch import save_file

    from ..core.checkpoint.save import stage_checkpoint, weight_names
    from ..core.checkpoint.transaction import Transaction

    final = recipe.output_dir
    txn = Transaction(final, weights=weight_names(model))
    with txn as staging:
        stage_checkpoint(model, txn)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / RECIPE_FILE).write_text(recipe.to_yaml())
        if scores:
            save_file(scores_to_tensors(scores), str(staging / SCORES_FILE))
        if recipe.output.plots:
            from .report import draw_plots

            results["plots"] = [p.relative_to(staging).as_posix() for p in draw_plots(staging, results)]
        (staging / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
        if recipe.output.card:
            from .card import build_card

            build_card(staging).save(staging / "README.md")
    logger.info("saved to %s", final)
    return final


# ---- Sweep ------------------------------------------------------------------------------------------------------

BUDGET_KEYS = ("macs_ratio", "params_ratio", "latency_ratio")


def sweep(recipe: Recipe, ratios: list, key: str = "macs_ratio") -> dict:
    """One-shot pruning of the recipe's dense model at each budget in ``ratios`` (``pruning.<key>``), each
    evaluated and timed against the dense model; writes ``sweep.json``, ``sweep.md`` and ``pareto.png`` into
    ``<output dir>-sweep``. Returns ``{"dense": {...}, "points": [...]}``."""
    from ..core import cost
    from ..pruning.oneshot import prune

    # Everything about the arguments is checked before the dense model is loaded and evaluated (minutes).
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a hfprune.recipe.Recipe (load_recipe(...)), got {type(recipe).__name__}")
    if not isinstance(key, str) or key not in BUDGET_KEYS:
        raise ValueError(f"sweep key {key!r}; choose one of {BUDGET_KEYS}")
    if recipe.method != "oneshot":
        raise ValueError("sweep runs one-shot pruning; use a recipe with method: oneshot")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)) or not ratios:
        raise ValueError(f"ratios={ratios!r}: give a non-empty list of budgets in (0, 1], e.g. [0.4, 0.6, 0.8]")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"sweep ratio {ratio!r} ({key}): each ratio must be a number in (0, 1]")
    budgets = {k: None for k in BUDGET_KEYS + ("head_ratio", "ffn_ratio")}
    # PruningConfig checks each budget with the recipe's other settings (scope, recovery) now, not mid-sweep
    configs = [(float(r), dataclasses.replace(recipe.pruning, **{**budgets, key: float(r)})) for r in sorted(ratios)]
    path = resolve_model_path(recipe)
    tokenizer = load_tokenizer(recipe, path)
    dense = load_model(recipe, path)
    data = load_data(recipe, tokenizer)
    if data is None:
        raise ValueError("sweep needs data to evaluate each budget (data.loader is none)")
    d, e = recipe.data, recipe.evaluation
    collate = collator(recipe, tokenizer, dense)
    calibration = batches(subset(data[d.train_split], d.calibration_samples, recipe.seed), collate,
                          d.calibration_batch_size)
    eval_batches = batches(subset(data[d.eval_split], d.max_eval_samples, recipe.seed), collate, e.batch_size)
    batch = latency_input(recipe, dense, eval_batches)
    dense_cost = cost.estimate(dense, seq_len=recipe.pruning.seq_len)
    out = {"dense": {"metrics": evaluate_model(recipe, dense, eval_batches), "macs": dense_cost.macs,
                     "params": dense_cost.params}, "points": [], "key": key, "hardware": hardware(),
           "criterion": recipe.pruning.criterion,
           "recovery": recipe.pruning.resolved_recovery + ("+bias" if recipe.pruning.bias_compensation else "")}
    scores = None
    if recipe.pruning.resolved_recovery == "none" and not recipe.pruning.bias_compensation \
            and key != "latency_ratio":
        # Without recovery the plan is a pure function of the scores and the budget: score the dense model once.
        from ..pruning.importance import get_importance

        p = recipe.pruning
        scorer = get_importance(p.criterion, **({"seed": p.seed} if p.criterion == "random" else {}))
        scores = scorer.score(dense.eval(), calibration if scorer.needs_data else None)
    for ratio, config in configs:
        model = copy.deepcopy(dense)
        if scores is not None:
            from ..core.apply import apply_plan
            from ..pruning.oneshot import plan_from_scores

            apply_plan(model, plan_from_scores(model, scores, config))
        else:
            prune(model, calibration, config)
        after = cost.estimate(model, seq_len=config.seq_len)
        times = time_models({"dense": dense, "pruned": model}, batch, e.latency_rounds)
        point = {"ratio": float(ratio), "metrics": evaluate_model(recipe, model, eval_batches),
                 "macs": after.macs, "params": after.params,
                 "latency_ms": statistics.median(times["pruned"]),
                 "dense_latency_ms": statistics.median(times["dense"])}
        logger.info("%s=%.2f: %s", key, ratio, point["metrics"])
        out["points"].append(point)
        del model
    target = recipe.output_dir.with_name(recipe.output_dir.name + "-sweep")  # beside the checkpoint, not in it
    target.mkdir(parents=True, exist_ok=True)
    (target / "sweep.json").write_text(json.dumps(out, indent=1) + "\n")
    (target / "sweep.md").write_text(sweep_table(out) + "\n")
    from .report import plot_pareto

    out["plot"] = str(plot_pareto(out, target / "pareto.png"))
    return out


def sweep_table(s: dict) -> str:
    metric = next(iter(s["dense"]["metrics"]), None)
    rows = [f"| {s['key']} | {metric} | MACs / dense | latency / dense |", "|---:|---:|---:|---:|",
            f"| dense | {s['dense']['metrics'].get(metric, float('nan')):.4f} | 1.00 | 1.00 |"]
    for p in s["points"]:
        rows.append(f"| {p['ratio']:.2f} | {p['metrics'].get(metric, float('nan')):.4f} | "
                    f"{p['macs'] / s['dense']['macs']:.2f} | {p['latency_ms'] / p['dense_latency_ms']:.2f} |")
    return "\n".join(rows)

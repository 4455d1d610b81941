# Copyright hfprune contributors. Apache-2.0.
"""Measuring a recipe's models: its metrics (through the task, with F1 averaged to fit the labels), the device
latency is timed on, and the batch dense and pruned models are timed with. Used by runs and sweeps."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .recipe import Recipe
from .specs import EvalSpec
from .tasks import get_task


def evaluate_model(recipe: Recipe, model, eval_batches: list) -> dict:
    """The recipe's metrics of ``model`` on ``eval_batches``, through hfprune's (local) evaluate modules. F1 is
    averaged as :func:`f1_average` says, and named ``f1 (macro)`` etc. unless binary (``f1``, as always)."""
    evaluation = recipe.evaluation
    average = f1_average(evaluation, model)
    if average is not None:
        evaluation = replace(evaluation, f1_average=average)
    metrics = get_task(recipe.model.task).evaluate(model, eval_batches, evaluation, recipe.seed)
    return {metric_label(k, average): v for k, v in metrics.items()}


def f1_average(evaluation: EvalSpec, model) -> str | None:
    """How F1 averages over classes: ``evaluation.f1_average`` when the recipe sets it, else binary (the F1 of
    class 1) for a model with two labels and macro for more; ``None`` when the recipe has no f1 metric."""
    if "f1" not in evaluation.metrics:
        return None
    if evaluation.f1_average is not None:
        return evaluation.f1_average
    return "macro" if getattr(model.config, "num_labels", 2) > 2 else "binary"


def eval_record(recipe: Recipe, model, eval_batches: list | None) -> dict:
    """``hfprune_results.json``'s ``eval``: the split, its examples, and how the metrics were computed (the tables
    name it): F1's averaging and MASE's seasonal lag, for the metrics the recipe has."""
    evaluation = recipe.evaluation
    out = {"split": recipe.data.eval_split,
           "examples": sum(len(next(iter(b.values()))) for b in eval_batches or [])}
    if "f1" in evaluation.metrics:
        out["f1_average"] = f1_average(evaluation, model)
    if "mase" in evaluation.metrics:
        out["mase_periodicity"] = evaluation.periodicity or 1
    return out


def metric_label(name: str, average: str | None) -> str:
    """The name a metric's value goes by in the results and tables: ``f1`` names its averaging unless binary."""
    return f"{name} ({average})" if name == "f1" and average not in (None, "binary") else name


def hardware() -> str:
    """The device latency is measured on, named for the model card: CPU model, cores, torch threads; or GPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from ..pruning.latency import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def latency_input(recipe: Recipe, model, eval_batches: list) -> dict | None:
    """A fixed-size batch to time dense and pruned models on (see the task's ``latency_input``); ``None`` when the
    task needs evaluation rows for it and there are none."""
    return get_task(recipe.model.task).latency_input(model, eval_batches, recipe.evaluation, recipe.seed)

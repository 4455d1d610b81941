# Copyright hfprune contributors. Apache-2.0.
"""The recipe sections hfprune defines itself (``model``, ``data``, ``finetune``, ``evaluation``, ``output``,
``hub``): one dataclass each, whose fields are the section's keys and whose ``__post_init__`` refuses a bad value
by name. :mod:`hfprune.pipeline.recipe` reads them from YAML; the tasks and the run read the built objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BUILTIN_LOADERS = ("movie_reviews", "files", "none")
FILE_FORMATS = ("csv", "json", "parquet", "text")
# package.module:function, as importlib and getattr take it
CALLABLE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
REPO_ID = re.compile(r"^(?:[\w][\w.-]*/)?[\w][\w.-]*$")
BUILTIN_TEACHERS = ("movie_review",)
# the averagings of hfprune's local f1 metric (hfprune/metrics/f1/f1.py: AVERAGES)
F1_AVERAGES = ("binary", "macro", "micro", "weighted")


@dataclass
class ModelSpec:
    path: str = field(default="asset:minilm", metadata={
        "help": "a local directory (relative: to the recipe file's folder), an offline asset (asset:minilm, "
                "asset:movie-review-teacher) or package.module:function returning a directory"})
    task: str = field(default="text-classification", metadata={
        "help": "a registered task: text-classification, causal-lm, forecasting (hfprune.pipeline.tasks)"})
    num_labels: int | None = field(default=None, metadata={"help": "classification labels (a new head if set)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "to start from an hfprune-pruned checkpoint"})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the dense model, for the model card's base_model (e.g. sentence-transformers/...)"})
    sequential: bool | None = field(default=None, metadata={
        "help": "method oneshot: prune layer by layer from disk (true), in memory (false), or null: layer by layer "
                "when the criterion allows it and the weights would not fit the in-memory run (as `hfprune "
                "prune`; the log says which path ran and why)"})
    dtype: str | None = field(default=None, metadata={
        "help": "layer by layer: the dtype the weights are pruned in (float32, bfloat16, float16, auto: the "
                "checkpoint's); setting it means sequential unless sequential is false"})
    offload_dir: str | None = field(default=None, metadata={
        "help": "layer by layer: keep the calibration activations in this folder (relative to the current "
                "directory) instead of in memory; setting it means sequential unless sequential is false"})

    def __post_init__(self):
        if not self.path.strip():
            raise ValueError("path='' is empty; give a directory, asset:minilm or package.module:function")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} must be >= 1 (1: regression) or null")
        if self.dtype is not None:
            from ..pruning.lazy import resolve_dtype

            resolve_dtype(None, self.dtype)  # a ValueError naming it
        if self.offload_dir is not None and not self.offload_dir.strip():
            raise ValueError("offload_dir='' is empty; give a folder, or null to keep activations in memory")
        if self.sequential is False and (self.dtype is not None or self.offload_dir is not None):
            raise ValueError("dtype and offload_dir apply to layer-by-layer pruning, but sequential is false; drop "
                             "them or set sequential to true or null")


@dataclass
class DataSpec:
    loader: str = field(default="movie_reviews", metadata={
        "help": "movie_reviews (hfprune.data.movie_reviews), files (datasets.load_dataset on local files), "
                "'package.module:function' returning a DatasetDict (called with `seed` and `kwargs`), or none "
                "(no data: data-free criteria only, no evaluation)"})
    format: str | None = field(default=None, metadata={"help": "with loader=files: csv, json, parquet, text"})
    files: dict | None = field(default=None, metadata={
        "help": "with loader=files: split name -> path(s); relative paths are relative to the recipe file's folder"})
    kwargs: dict = field(default_factory=dict, metadata={"help": "extra keyword arguments for the loader"})
    seed: int = field(default=0, metadata={"help": "seed of the split (the built-in loaders split with it)"})
    text_column: str = field(default="text", metadata={"help": "column tokenised for text tasks"})
    label_column: str = field(default="label", metadata={"help": "label column for classification"})
    time_column: str | None = field(default=None, metadata={
        "help": "forecasting from rows: the column of times (one regular step; the splits follow each other)"})
    target_columns: list[str] | None = field(default=None, metadata={
        "help": "forecasting from rows: the columns forecast (the model's channels)"})
    covariate_columns: list[str] | None = field(default=None, metadata={
        "help": "forecasting from rows: series known ahead, fed as time features (seq2seq families only)"})
    freq: str | None = field(default=None, metadata={
        "help": "forecasting: the sampling frequency, a pandas offset alias (30min, h, D, W, ME); sets the mase "
                "periodicity. None: the time column's step for rows, unknown for windows from a loader"})
    max_length: int = field(default=128, metadata={"help": "tokeniser truncation length"})
    train_split: str = field(default="train", metadata={"help": "split used for calibration and training"})
    validation_split: str | None = field(default="validation", metadata={"help": "split evaluated during training"})
    eval_split: str = field(default="test", metadata={"help": "split reported before/after pruning"})
    calibration_samples: int = field(default=256, metadata={"help": "training examples that score importance"})
    calibration_batch_size: int = field(default=32, metadata={"help": "batch size of the calibration pass"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on evaluated examples (None: all)"})

    def __post_init__(self):
        if self.loader == "files" and (not self.files or not self.format):
            raise ValueError("loader: files needs `format` (csv, json, parquet, text) and `files` (split -> path)")
        if self.loader not in BUILTIN_LOADERS and not CALLABLE_PATH.match(self.loader):
            raise ValueError(f"loader={self.loader!r}; use one of {BUILTIN_LOADERS} or 'package.module:function'")
        if self.format is not None and self.format not in FILE_FORMATS:
            raise ValueError(f"format={self.format!r}; choose one of {FILE_FORMATS}")
        for split, paths in (self.files or {}).items():
            if not (isinstance(paths, str) and paths or isinstance(paths, list) and paths
                    and all(isinstance(x, str) and x for x in paths)):
                raise ValueError(f"files[{split!r}]={paths!r}: give a path or a list of paths")
        for name in ("max_length", "calibration_samples", "calibration_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"max_eval_samples={self.max_eval_samples} must be >= 1 or null (all)")
        if self.freq is not None:
            from ..metrics.seasonality import seasonal_period

            seasonal_period(self.freq)  # a ValueError naming it
        for name in ("text_column", "label_column", "train_split", "eval_split"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}='' is empty; give a column or split name")


@dataclass
class FinetuneSpec:
    teacher: str | None = field(default=None, metadata={
        "help": f"a cached built-in fine-tuned model, one of {BUILTIN_TEACHERS} (hfprune.data.teachers)"})
    training: dict | None = field(default=None, metadata={
        "help": "TrainingArguments for fine-tuning the dense model first; the result is cached by its settings"})

    def __post_init__(self):
        if (self.teacher is None) == (self.training is None):
            raise ValueError("give exactly one of `teacher` (a cached built-in) or `training` (fine-tune here)")
        if self.teacher is not None and self.teacher not in BUILTIN_TEACHERS:
            raise ValueError(f"teacher={self.teacher!r}; built-in teachers: {BUILTIN_TEACHERS}")


@dataclass
class EvalSpec:
    metrics: list = field(default_factory=lambda: ["accuracy"], metadata={
        "help": "metric names: hfprune's local ones (accuracy, f1, mse, mae, mase, perplexity) or Hub names"})
    batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})
    latency: bool = field(default=True, metadata={"help": "measure dense and pruned latency"})
    latency_batch_size: int = field(default=32, metadata={"help": "batch size of the latency input"})
    latency_seq_len: int = field(default=128, metadata={"help": "tokens per row of the latency input"})
    latency_rounds: int = field(default=7, metadata={"help": "timed rounds (dense and pruned alternate)"})
    periodicity: int | None = field(default=None, metadata={
        "help": "seasonal lag m of the mase metric (forecasting); None: from the data's frequency (data.freq, or the "
                "time column's step: hourly 24, half-hourly 48, daily 7, ...), 1 where unknown"})
    f1_average: str | None = field(default=None, metadata={
        "help": f"how the f1 metric averages over classes, one of {F1_AVERAGES}; None: binary (F1 of class 1) for "
                "a model with two labels, macro for more"})

    def __post_init__(self):
        for name in ("batch_size", "latency_batch_size", "latency_seq_len", "latency_rounds", "periodicity"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        bad = [m for m in self.metrics if not isinstance(m, str) or not m.strip()]
        if bad:
            raise ValueError(f"metrics={self.metrics!r}: {bad[0]!r} is not a metric name (accuracy, f1, mse, ...)")
        if self.f1_average is not None:
            if self.f1_average not in F1_AVERAGES:
                raise ValueError(f"f1_average={self.f1_average!r}; choose one of {F1_AVERAGES}")
            if "f1" not in self.metrics:
                raise ValueError(f"f1_average={self.f1_average!r} but metrics={self.metrics!r} has no f1")

    def metric_kwargs(self, name: str) -> dict:
        """Keyword arguments this section sets for metric ``name``'s ``compute`` (f1's ``average``)."""
        return {"average": self.f1_average} if name == "f1" and self.f1_average is not None else {}


@dataclass
class OutputSpec:
    dir: str | None = field(default=None, metadata={"help": "checkpoint directory (default outputs/<name>)"})
    plots: bool = field(default=True, metadata={"help": "draw PNG plots into <dir>/plots"})
    card: bool = field(default=True, metadata={"help": "write a model card (README.md) into <dir>"})

    def __post_init__(self):
        if self.dir is not None and not self.dir.strip():
            raise ValueError("dir='' would write into the current directory; give a folder, or null for "
                             "outputs/<name>")


@dataclass
class HubSpec:
    repo_id: str | None = field(default=None, metadata={"help": "user/name on the Hub"})
    push: bool = field(default=False, metadata={"help": "push the checkpoint after the run"})
    private: bool | None = field(default=None, metadata={"help": "create the repo private (None: Hub default)"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (created if missing)"})
    create_pr: bool = field(default=False, metadata={"help": "open a pull request instead of committing"})

    def __post_init__(self):
        if self.push and not self.repo_id:
            raise ValueError("push: true needs repo_id (user/name)")
        if self.repo_id is not None and (not REPO_ID.match(self.repo_id) or ".." in self.repo_id
                                         or "--" in self.repo_id or len(self.repo_id) > 96):
            raise ValueError(f"repo_id={self.repo_id!r} is not a Hub repo id like user/name")

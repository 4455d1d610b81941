# Copyright hfprune contributors. Apache-2.0.
"""``hfprune prune``'s arguments and the recipe ``data`` section its data flags describe.

Shared by ``hfprune prune``, ``hfprune sparsify`` and ``hfprune search`` (the same data options), so the flags and their
checks are written once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

ROWS_LOADER = "hfprune.data.rows:load_rows"
DEFAULT_METRICS = {"text-classification": ["accuracy"], "causal-lm": ["perplexity"], "forecasting": ["mse", "mae"]}


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, like the rest of the command's errors (every subcommand)."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: error: {message}")


@dataclass
class PruneArgs:
    """What ``hfprune prune`` prunes and where it saves; the pruning itself is a :class:`~hfprune.PruningConfig`."""

    model_dir: str = field(metadata={"help": "saved model directory (or asset:minilm)"})
    output_dir: str = field(metadata={"help": "where the pruned checkpoint, card and plots go"})
    task: str = field(default="text-classification", metadata={"help": "text-classification, causal-lm, forecasting"})
    data: str = field(default="none", metadata={
        "help": "calibration/evaluation data: movie_reviews, package.module:function, or none (data-free criteria); "
                "your own data: --data_files or --dataset"})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "your own data: file(s) (.csv .tsv .json .jsonl .parquet .txt), one pool cut into train/validation/"
                "test, or SPLIT=PATH each (train=a.csv test=b.csv)"})
    dataset: str | None = field(default=None, metadata={"help": "your own data: a datasets name or local folder"})
    dataset_config: str | None = field(default=None, metadata={"help": "with --dataset: its configuration name"})
    split: str | None = field(default=None, metadata={
        "help": "with --dataset: load this split and cut it into train/validation/test (default: its own splits)"})
    text_column: str = field(default="text", metadata={"help": "the column of text (text tasks)"})
    label_column: str = field(default="label", metadata={
        "help": "the column of labels (text-classification): ids, or words mapped to ids in sorted order"})
    time_column: str | None = field(default=None, metadata={"help": "forecasting: the column of times"})
    target_columns: list[str] | None = field(default=None, metadata={
        "help": "forecasting: the column(s) to forecast, one per model channel"})
    covariate_columns: list[str] | None = field(default=None, metadata={
        "help": "forecasting: column(s) known ahead, fed as time features (seq2seq models only)"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per text row; causal-lm: the block size (default 128)"})
    num_labels: int | None = field(default=None, metadata={"help": "classification labels, for a fresh head"})
    trust_remote_code: bool = field(default=False, metadata={"help": "the model is itself a pruned checkpoint"})
    latency: bool = field(default=True, metadata={"help": "measure latency before/after"})
    # --sequential / --no-sequential are read by cmd_prune itself (neither: layer by layer when it can and must)
    dtype: str | None = field(default=None, metadata={
        "help": "load and prune the weights in this dtype (float32, bfloat16, float16; default: the checkpoint's)"})
    offload_dir: str | None = field(default=None, metadata={
        "help": "layer-by-layer pruning: keep the calibration activations in this folder instead of in memory"})
    calibration_samples: int | None = field(default=None, metadata={
        "help": "calibration examples (causal-lm: blocks of --max_length, else --seq_len, tokens; default 256)"})


def _names(values: list | None) -> list | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: columns may be given space- or comma-separated."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _data_files(values: list) -> str | list | dict:
    """``--data_files`` values: paths (one pool), or ``SPLIT=PATH`` each (a split may repeat)."""
    named = [v for v in values if "=" in v and not os.path.exists(v)]
    if not named:
        return values[0] if len(values) == 1 else list(values)
    if len(named) != len(values):
        raise ValueError(f"--data_files {' '.join(values)}: give either paths (one pool, cut into splits) or "
                         "SPLIT=PATH for every file, not both")
    files = {}
    for value in values:
        split, path = value.split("=", 1)
        if not split or not path:
            raise ValueError(f"--data_files {value!r}: write SPLIT=PATH, e.g. train=data/train.csv")
        files.setdefault(split, []).append(path)
    return files


def prune_data(args: PruneArgs) -> dict:
    """The recipe ``data`` section the flags describe (what a recipe for the same data would say); flags that
    do not fit together are refused, naming them."""
    own = {"--data_files": args.data_files, "--dataset": args.dataset}
    given = [name for name, value in own.items() if value is not None]
    series = {"--time_column": args.time_column, "--target_columns": args.target_columns,
              "--covariate_columns": args.covariate_columns}
    if len(given) > 1:
        raise ValueError("give --data_files (local files) or --dataset (a datasets name or folder), not both")
    if given and args.data != "none":
        raise ValueError(f"--data {args.data} and {given[0]} both name the data; give one")
    if args.dataset is None and (args.dataset_config is not None or args.split is not None):
        raise ValueError("--dataset_config and --split go with --dataset")
    if args.task != "forecasting":
        misplaced = [name for name, value in series.items() if value is not None]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: for --task forecasting only (this is --task {args.task})")
    if not given:
        loose = [name for name, value in series.items() if value is not None]
        if loose:
            raise ValueError(f"{', '.join(loose)} describe your own data: add --data_files or --dataset")
        return {"loader": args.data, **({"max_length": args.max_length} if args.max_length else {})}
    if args.dataset is not None:
        kwargs = {"dataset": args.dataset, **({"config": args.dataset_config} if args.dataset_config else {}),
                  **({"split": args.split} if args.split else {})}
    else:
        from ..data.rows import data_file_paths

        kwargs = {"files": _data_files(args.data_files)}
        data_file_paths(kwargs["files"])  # a missing or empty file is named now, before any model loads
    section = {"loader": ROWS_LOADER, "kwargs": kwargs}
    if args.task == "forecasting":
        missing = [name for name in ("--time_column", "--target_columns") if series[name] is None]
        if missing:
            raise ValueError(f"--task forecasting from {given[0]} needs {' and '.join(missing)} (the column of "
                             "times and the column(s) to forecast)")
        kwargs["time_column"] = args.time_column  # one file is cut into spans of time, not shuffled
        section.update(time_column=args.time_column, target_columns=_names(args.target_columns))
        if args.covariate_columns is not None:
            section["covariate_columns"] = _names(args.covariate_columns)
    else:
        section.update(text_column=args.text_column)
        if args.task == "text-classification":
            section["label_column"] = args.label_column
    if args.max_length is not None:
        section["max_length"] = args.max_length
    return section


def calibration_texts(args) -> list | None:
    """The calibration text the data flags name (``--data bbc_news``, or ``--data_files`` / ``--dataset`` read as
    ``hfprune prune`` reads them), or ``None`` when they name none. ``args``: the namespace of
    ``hfprune sparsify`` or ``hfprune search`` (``data``, ``data_files``, ``dataset``, ``dataset_config``,
    ``split``, ``text_column``, ``model_dir``, ``output``, ``seed``)."""
    if args.data not in ("none", "bbc_news"):
        raise ValueError(f"--data {args.data!r}: use bbc_news, or --data_files / --dataset for your own text")
    if args.data == "bbc_news":
        if args.data_files or args.dataset:
            raise ValueError("--data bbc_news and --data_files/--dataset both name the data; give one")
        from ..data.text import bbc_news

        return list(bbc_news(seed=args.seed)["calibration"]["text"])
    if args.data_files is None and args.dataset is None:
        return None
    from ..data.rows import load_rows

    section = prune_data(PruneArgs(model_dir=args.model_dir, output_dir=args.output, task="causal-lm",
                                   data_files=args.data_files, dataset=args.dataset,
                                   dataset_config=args.dataset_config, split=args.split,
                                   text_column=args.text_column))
    split = load_rows(seed=args.seed, **section["kwargs"])["train"]
    if args.text_column not in split.column_names:
        raise ValueError(f"--text_column {args.text_column!r} is not a column of the data: {split.column_names}")
    return [t for t in split[args.text_column] if isinstance(t, str) and t.strip()]

# Copyright hfprune contributors. Apache-2.0.
"""Tasks: what a recipe's ``model.task`` names. One class per task owns everything that differs between tasks:
the model class it loads, the tokenizer (if any), how data is tokenised and collated, how a model is evaluated,
the input latency is timed on, and what the model card says. The run and the sweep only call these methods.

Adding a task is one class here, registered with :func:`register_task` (see docs/extending.md). Importing this
module is cheap: torch and transformers load when a method runs.

Example:

```python
>>> from hfprune.pipeline.tasks import TASKS, get_task
>>> sorted(TASKS)
['causal-lm', 'forecasting', 'text-classification']
>>> get_task("causal-lm").card_task_type
'text-generation'
```
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from .specs import DataSpec, EvalSpec, ModelSpec

TASKS: dict[str, type[Task]] = {}  # name -> class, in registration order
logger = logging.getLogger("hfprune")


def register_task(cls: type) -> type:
    """Class decorator: make ``cls`` (a :class:`Task` with a new ``name``) what recipes name ``model.task``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task takes a Task subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs its own `name` (what recipes write as model.task)")
    if name in TASKS and TASKS[name] is not cls:
        raise ValueError(f"task {name!r} is already registered by {TASKS[name].__name__}")
    TASKS[name] = cls
    return cls


def get_task(name: str) -> Task:
    """The task recipes call ``name``."""
    if name not in TASKS:
        raise ValueError(f"model.task={name!r}; choose one of {tuple(TASKS)}")
    return TASKS[name]()


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


class Task:
    """What one task does at each step of a run. Subclasses set the class attributes and implement
    :meth:`collator`, :meth:`evaluate_batch` and :meth:`latency_input`; the rest has defaults."""

    name: ClassVar[str]
    # the transformers auto class the model loads with; None: the class the saved config's `architectures` names
    auto_class: ClassVar[str | None] = None
    card_task_type: ClassVar[str] = "other"  # the model card's task type (a Hub task id)
    pipeline_tag: ClassVar[str | None] = None  # the card's pipeline tag: only where transformers has a pipeline

    # ---- model, tokenizer, data -------------------------------------------------------------------------------

    def load_model(self, path: Path, spec: ModelSpec):
        """The model at ``path``. A checkpoint hfprune saved loads with :func:`hfprune.from_pretrained`, which
        rebuilds it with the installed hfprune: no code from the checkpoint runs, whatever
        ``model.trust_remote_code`` says (it only applies to other checkpoints)."""
        import transformers

        from ..core.checkpoint.load import from_pretrained, is_hfprune_checkpoint

        kwargs = {}
        if spec.num_labels is not None:
            kwargs["num_labels"] = spec.num_labels
        auto = getattr(transformers, self.auto_class) if self.auto_class else None
        if is_hfprune_checkpoint(path):
            return from_pretrained(path, auto, **kwargs)  # auto None: the saved head class
        kwargs["trust_remote_code"] = spec.trust_remote_code
        if auto is not None:
            return auto.from_pretrained(path, **kwargs)
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
        return load_class_from_config(config).from_pretrained(path, **kwargs)

    def load_tokenizer(self, path: Path):
        """The tokenizer saved with the model, or ``None`` for a task whose inputs are not text."""
        return None

    def prepare_data(self, raw, tokenizer, data: DataSpec, model=None):
        """The loaded ``DatasetDict`` as the model's forward takes it (tokenised, labels in ``labels``). ``model``
        is the loaded model, for what the data take from it (a forecaster's window lengths) or give it (label
        names into its config); ``None`` where a caller has no model, and then such data are refused."""
        return raw

    def resolve_evaluation(self, raw, data: DataSpec, evaluation: EvalSpec, model=None) -> EvalSpec:
        """``evaluation`` with what the recipe left to the data filled in (the forecasting task's MASE season)."""
        return evaluation

    def collator(self, tokenizer, model):
        raise NotImplementedError

    # ---- evaluation and latency -------------------------------------------------------------------------------

    def check_evaluation(self, model, evaluation: EvalSpec) -> None:
        """Refuse settings that cannot be evaluated on ``model``, before any batch runs."""

    def evaluate_batch(self, model, batch: dict, seen: dict) -> None:
        """Run one evaluation batch (on the model's device) and append what the metrics need to the lists in
        ``seen`` (``predictions`` and ``references`` unless :meth:`metric_inputs` reads others)."""
        raise NotImplementedError

    def metric_inputs(self, name: str, seen: dict, evaluation: EvalSpec) -> dict:
        """Keyword arguments of metric ``name``'s ``compute`` (with those the recipe sets, e.g. f1's average)."""
        return {"predictions": seen["predictions"], "references": seen["references"],
                **evaluation.metric_kwargs(name)}

    def evaluate(self, model, batches: list, evaluation: EvalSpec, seed: int) -> dict:
        """``evaluation.metrics`` of ``model`` on ``batches``, through hfprune's (local) evaluate modules."""
        import torch

        from .. import metrics as hf_metrics
        from ..core.calibration import iterate, to_device

        self.check_evaluation(model, evaluation)
        device = next(model.parameters()).device
        model.eval()
        with torch.inference_mode():
            # the same random stream for every model evaluated: Informer's ProbSparse attention samples keys in
            # forward
            torch.manual_seed(seed)
            seen = defaultdict(list)
            for batch in iterate(batches, "evaluate"):
                self.evaluate_batch(model, to_device(dict(batch), device), seen)
            out = {}
            for name in evaluation.metrics:
                result = hf_metrics.load(name).compute(**self.metric_inputs(name, seen, evaluation))
                out.update({k: float(v) for k, v in result.items()})
        return out

    def latency_input(self, model, eval_batches: list, evaluation: EvalSpec, seed: int) -> dict | None:
        """A batch of ``evaluation.latency_batch_size`` rows to time the dense and pruned model on; ``None`` when
        the task cannot build one without evaluation data and there is none."""
        raise NotImplementedError


def require_columns(raw, columns: dict) -> None:
    """Every split of ``raw`` has rows and the ``columns`` (``{recipe key: column}``); else the error names the
    key, the split and the columns it has."""
    for split, rows in raw.items():
        found = rows.column_names
        for key, column in columns.items():
            if column not in found:
                raise ValueError(f"data.{key}={column!r} is not a column of split {split!r}; its columns are {found}")
        if rows.num_rows == 0:
            raise ValueError(f"data: split {split!r} has no rows (columns found: {found})")


class TextTask(Task):
    """Tasks on tokenised text: the tokenizer saved with the model, ``text_column`` tokenised."""

    def load_tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:  # decoder LMs ship without one; padding is masked out of every loss anyway
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def tokenize(self, batch: dict, tokenizer, data: DataSpec) -> dict:
        """One ``datasets.map`` batch of raw rows -> the model's inputs."""
        return tokenizer(batch[data.text_column], truncation=True, max_length=data.max_length)

    def prepare_data(self, raw, tokenizer, data: DataSpec, model=None):
        if not self.needs_tokenising(raw, tokenizer, data):
            return raw
        return raw.map(lambda batch: self.tokenize(batch, tokenizer, data), batched=True,
                       remove_columns=raw[data.train_split].column_names, desc="tokenise")

    def needs_tokenising(self, raw, tokenizer, data: DataSpec) -> bool:
        """Whether ``raw`` holds text to tokenise (``False``: token ids from its loader). Text rows are checked:
        every split has rows and ``data.text_column``, else the error names the columns found."""
        found = raw[data.train_split].column_names
        if tokenizer is None or data.text_column not in found and "input_ids" in found:
            return False  # already tokenised by its loader
        require_columns(raw, {"text_column": data.text_column})
        return True

    def latency_input(self, model, eval_batches: list, evaluation: EvalSpec, seed: int) -> dict | None:
        """Random token ids of ``latency_batch_size`` x ``latency_seq_len``: content does not change the work."""
        import torch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, model.config.vocab_size, (evaluation.latency_batch_size, evaluation.latency_seq_len),
                            generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@register_task
class TextClassificationTask(TextTask):
    name = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    card_task_type = "text-classification"
    pipeline_tag = "text-classification"

    def prepare_data(self, raw, tokenizer, data: DataSpec, model=None):
        """Labels written as words become ids: the sorted names of the train split (or the model's own
        ``id2label`` when its config names its labels), the same for every split, and the names go into the
        model's ``id2label`` / ``label2id``, so the saved checkpoint's config.json carries them."""
        from ..data.labels import encode_labels

        if self.needs_tokenising(raw, tokenizer, data):
            require_columns(raw, {"label_column": data.label_column})
            raw, _ = encode_labels(raw, data.label_column, data.train_split, getattr(model, "config", None))
        return super().prepare_data(raw, tokenizer, data, model)

    def tokenize(self, batch: dict, tokenizer, data: DataSpec) -> dict:
        out = super().tokenize(batch, tokenizer, data)
        out["labels"] = batch[data.label_column]
        return out

    def collator(self, tokenizer, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def evaluate_batch(self, model, batch: dict, seen: dict) -> None:
        labels = batch.pop("labels")
        seen["predictions"] += model(**batch).logits.argmax(-1).tolist()
        seen["references"] += labels.tolist()


@register_task
class CausalLMTask(TextTask):
    """Next-token prediction; evaluated by the mean loss per token (perplexity), padding masked out."""

    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    card_task_type = "text-generation"
    pipeline_tag = "text-generation"

    def prepare_data(self, raw, tokenizer, data: DataSpec, model=None):
        """Text is tokenised and packed into blocks of ``data.max_length`` tokens, each split on its own (documents
        joined by EOS; a block never holds text of two splits, and the last incomplete block is dropped)."""
        import datasets

        from ..data.text import lm_blocks

        if not self.needs_tokenising(raw, tokenizer, data):
            return raw
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if positions is not None and data.max_length > positions:
            raise ValueError(f"data.max_length={data.max_length}: blocks longer than the model's "
                             f"{positions} positions (max_position_embeddings)")
        blocks = {}
        for split, rows in raw.items():
            try:
                blocks[split] = lm_blocks(rows, tokenizer, data.max_length, text_column=data.text_column)
            except ValueError as err:
                raise ValueError(f"data: split {split!r}: {err}; lower data.max_length or give more text") from None
        return datasets.DatasetDict({k: v.remove_columns("labels").with_format(None) for k, v in blocks.items()})

    def collator(self, tokenizer, model):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def evaluate_batch(self, model, batch: dict, seen: dict) -> None:
        from ..perplexity import nll_sum

        labels = batch.pop("labels")
        total, n = nll_sum(model(**batch, use_cache=False).logits, labels)
        seen["losses"].append(float(total) / max(n, 1))
        seen["num_tokens"].append(n)

    def metric_inputs(self, name: str, seen: dict, evaluation: EvalSpec) -> dict:
        return {"losses": seen["losses"], "num_tokens": seen["num_tokens"]}


@register_task
class ForecastingTask(Task):
    """Time-series forecasting: the saved head class (PatchTST, TimesFM, the seq2seq families), windows from
    :mod:`hfprune.data.timeseries`, no tokenizer; point forecasts scored per window and channel."""

    name = "forecasting"
    card_task_type = "time-series-forecasting"

    def prepare_data(self, raw, tokenizer, data: DataSpec, model=None):
        """Windows pass through; rows (``data.time_column``, ``data.target_columns``, optional
        ``data.covariate_columns``) are cut into the model's windows, the splits being consecutive spans of time
        (:func:`hfprune.data.forecast_rows.model_windows`)."""
        from ..data.forecast_rows import model_windows

        found = raw[data.train_split].column_names
        if "past_values" in found:
            return raw  # windows from a loader (hfprune.data.timeseries.forecast_windows)
        if data.time_column is None or not data.target_columns:
            raise ValueError(f"data: the rows have columns {found}, not forecasting windows (past_values, "
                             "future_values); set data.time_column and data.target_columns to cut them into windows")
        if model is None:
            raise ValueError("cutting rows into forecasting windows needs the model (its context_length and "
                             "prediction_length): prepare_data(raw, None, data, model)")
        splits = [data.train_split, data.validation_split, data.eval_split]
        splits = [s for s in dict.fromkeys(splits) if s is not None and s in raw]
        windows = model_windows({s: raw[s] for s in splits}, model.config, data.time_column, data.target_columns,
                                data.covariate_columns, train_split=data.train_split)
        return windows.dataset

    def resolve_evaluation(self, raw, data: DataSpec, evaluation: EvalSpec, model=None) -> EvalSpec:
        """The mase periodicity, when the recipe leaves it unset: the season of the data's frequency (``data.freq``,
        else the step of the train split's ``data.time_column``: hourly 24, half-hourly 48, daily 7; see
        :func:`hfprune.metrics.seasonality.seasonal_period`), 1 when the frequency is unknown or the season does not
        fit in the model's context. An explicit ``evaluation.periodicity`` wins."""
        from ..data.forecast_rows import time_step
        from ..metrics.seasonality import seasonal_period

        if evaluation.periodicity is not None or "mase" not in evaluation.metrics:
            return evaluation
        freq = data.freq
        if freq is None and data.time_column is not None and data.train_split in raw:
            freq = time_step(raw[data.train_split], data.time_column)
        period = seasonal_period(freq) if freq else 1
        context = getattr(getattr(model, "config", None), "context_length", None)
        if context is not None and period >= context:
            logger.warning("mase: the season of freq %s (%d steps) does not fit in the model's context_length=%d; "
                           "scaling by the naive error of the previous step (periodicity 1)", freq, period, context)
            period = 1
        return replace(evaluation, periodicity=period)

    def collator(self, tokenizer, model):
        from ..data.timeseries import ForecastCollator

        return ForecastCollator(model.config)

    def check_evaluation(self, model, evaluation: EvalSpec) -> None:
        context = getattr(model.config, "context_length", None)
        if "mase" in evaluation.metrics and context is not None and (evaluation.periodicity or 1) >= context:
            raise ValueError(f"evaluation.periodicity={evaluation.periodicity} must be below the model's "
                             f"context_length={context}: MASE scales by the seasonal-naive error within the context")

    def evaluate_batch(self, model, batch: dict, seen: dict) -> None:
        from ..data.timeseries import SEQ2SEQ_FAMILIES
        from ..forecast import channel_series, greedy_forecast, point_forecast

        # The model must not see the future: seq2seq families would read it through their lags (teacher forcing),
        # so they forecast greedily from the past alone.
        future = batch.pop("future_values")
        batch.pop("future_observed_mask", None)
        if model.config.model_type in SEQ2SEQ_FAMILIES:
            pred = greedy_forecast(model, batch)
        else:
            pred = point_forecast(model(**batch))  # (B, H, C)
        # one series per window and channel; MASE scales each by the naive error of its own context
        context = getattr(model.config, "context_length", None)
        seen["predictions"] += channel_series(pred).tolist()
        seen["references"] += channel_series(future).tolist()
        seen["training"] += channel_series(batch["past_values"][:, -context:]).tolist()

    def metric_inputs(self, name: str, seen: dict, evaluation: EvalSpec) -> dict:
        if name == "mase":
            return {**super().metric_inputs(name, seen, evaluation), "training": seen["training"],
                    "periodicity": evaluation.periodicity or 1}
        return super().metric_inputs(name, seen, evaluation)

    def latency_input(self, model, eval_batches: list, evaluation: EvalSpec, seed: int) -> dict | None:
        """The first evaluation rows repeated to ``latency_batch_size``: a forecaster's input is a window of real
        history, which random numbers would not stand for; ``None`` without evaluation data."""
        import torch

        if not eval_batches:
            return None
        first, size = eval_batches[0], evaluation.latency_batch_size
        reps = -(-size // next(iter(first.values())).shape[0])
        return {k: torch.cat([v] * reps)[:size] if isinstance(v, torch.Tensor) else v for k, v in first.items()}

# Copyright hfprune contributors. Apache-2.0.
"""The ``Importance`` interface, its registry, and the calibration pass shared by data-driven criteria."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.masking import Masks

_REGISTRY: dict = {}


class Importance:
    """Scores heads and neurons. ``needs_data`` criteria get calibration batches."""

    name: str = ""
    needs_data: bool = True
    # True when scores estimate the loss change of removing a unit (gradient criteria), so they compare across
    # layers as they are; otherwise PruningConfig(normalize="auto") normalises them per block first
    loss_scale: bool = False

    def score(self, model: nn.Module, batches: Iterable | None = None) -> dict:
        raise NotImplementedError


def register_importance(cls: type) -> type:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"importance criterion name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def supported_importance() -> list:
    return sorted(_REGISTRY)


def get_importance(name: str, **kwargs) -> Importance:
    if name not in _REGISTRY:
        raise ValueError(f"unknown importance criterion {name!r}; supported: {', '.join(supported_importance())}")
    return _REGISTRY[name](**kwargs)


def require_data(name: str, batches) -> None:
    if batches is None:
        raise ValueError(f"the {name!r} criterion needs calibration data")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def iterate(batches, desc: str):
    batches = calibration_batches(batches)
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, leave=False)


def calibration_batches(data, batch_size: int = 32, tokenizer=None, collate_fn=None):
    """Model-ready batches from a DataLoader, a list (or other iterable) of dicts, or a ``datasets.Dataset``.

    A ``Dataset`` of tokenised columns is batched in order (``batch_size`` rows) and collated with ``collate_fn``,
    else ``DataCollatorWithPadding(tokenizer)`` when a tokenizer is given, else :func:`stack_features`. Columns
    that are not numbers (the raw ``text``) are left out; ``label`` becomes ``labels`` as the Trainer does. A
    dataset with no ``input_ids`` but a text column (``text``, or its only string column) is tokenised batch by
    batch when a tokenizer is given. Anything else is returned as it is.
    """
    try:
        import datasets
    except ImportError:  # datasets is optional for users who pass batches
        return data
    if not isinstance(data, datasets.Dataset):
        return data
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    keep = [name for name, feature in data.features.items() if _numeric(feature)]
    text = None
    if tokenizer is not None and collate_fn is None and "input_ids" not in data.column_names:
        text = _text_column(data)
    if not keep and text is None:
        raise ValueError(f"the calibration dataset has no numeric (tokenised) columns: {list(data.features)}; "
                         + _TOKENISE_HINT)
    if collate_fn is None:
        if tokenizer is not None:
            from transformers import DataCollatorWithPadding

            collate_fn = DataCollatorWithPadding(tokenizer)
        else:
            collate_fn = stack_features
    if text is not None:
        collate_fn = _tokenising(collate_fn, tokenizer, text)
    data = data.select_columns(keep + ([text] if text is not None else []))
    return [collate_fn([data[j] for j in range(i, min(i + batch_size, len(data)))])
            for i in range(0, len(data), batch_size)]


_TOKENISE_HINT = ("tokenise it first (dataset.map(lambda b: tokenizer(b['text'], truncation=True), batched=True)) or "
                  "pass tokenizer= to hfprune.prune, which tokenises the text column")


def _text_column(data) -> str | None:
    """The column to tokenise: ``text``, else the dataset's only string column."""
    import datasets

    strings = [name for name, f in data.features.items()
               if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
    if "text" in strings:
        return "text"
    return strings[0] if len(strings) == 1 else None


def _tokenising(collate_fn, tokenizer, column: str):
    """Collate rows after tokenising their ``column`` (truncated to the tokenizer's maximum length)."""

    def collate(rows: list) -> dict:
        encoded = tokenizer([row[column] for row in rows], truncation=True)
        rows = [{**{k: v for k, v in row.items() if k != column}, **{k: v[i] for k, v in encoded.items()}}
                for i, row in enumerate(rows)]
        return collate_fn(rows)

    return collate


def _numeric(feature) -> bool:
    import datasets

    while isinstance(feature, (datasets.Sequence, datasets.List if hasattr(datasets, "List") else ())):
        feature = feature.feature
    if isinstance(feature, list):  # a plain list of a feature type
        return _numeric(feature[0]) if feature else False
    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string")


PAD_VALUES = {"labels": -100, "label": -100}


def stack_features(rows: list) -> dict:
    """Collate dataset rows without a tokenizer: stack equal-length values; pad unequal ones only when an
    ``attention_mask`` says which positions are padding (ids and masks with 0, labels with -100)."""
    out = {}
    for name in rows[0]:
        values = [torch.as_tensor(row[name]) for row in rows]
        lengths = {tuple(v.shape) for v in values}
        if len(lengths) > 1:
            if "attention_mask" not in rows[0] or any(v.dim() != 1 for v in values):
                raise ValueError(f"column {name!r} has rows of different lengths {sorted(lengths)[:3]}...; pass "
                                 "a tokenizer (padding collator) or collate_fn, or pad the dataset")
            values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True,
                                                     padding_value=PAD_VALUES.get(name, 0))
        else:
            values = torch.stack(values)
        out["labels" if name == "label" else name] = values
    return out


def calibration_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's loss on ``batch``; without labels, cross-entropy against its own predictions
    (self-supervised, as Kwon et al. do for unlabeled calibration data)."""
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    logits = out.logits
    with torch.no_grad():
        target = logits.argmax(-1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def reduce_across_processes(scores: dict) -> dict:
    """Sum scores over torch.distributed ranks, so every rank selects the same plan."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for key in sorted(scores):
            torch.distributed.all_reduce(scores[key], op=torch.distributed.ReduceOp.SUM)
    return scores


def zero_scores(model: nn.Module) -> dict:
    return {k: torch.zeros_like(g) for k, g in Masks(model).gates.items()}


# -- checks -------------------------------------------------------------------------------------


def check_batches(model: nn.Module | None, data, tokenizer=None, what: str = "calibration"):
    """Refuse calibration data that cannot feed ``model``, before any pass over it or any change to the model.

    ``data`` may be ``None``, an iterable of batches (dicts of model inputs: a list, a DataLoader) or a
    ``datasets.Dataset``. Only the first batch (or row) is read, so checking costs nothing next to a pass. A
    one-shot iterator (a generator) is returned as a list, since reading its first batch would lose it; anything
    else is returned unchanged. With ``model=None`` only the shape of the data is checked.
    """
    if data is None:
        return None
    main = _main_input(model)
    example = f"[{{'{main}': tensor, ...}}, ...]"
    if isinstance(data, torch.Tensor):
        raise TypeError(f"{what} is a tensor of shape {tuple(data.shape)}; pass batches, a list of dicts of model "
                        f"inputs like {example}, a DataLoader, or a tokenised datasets.Dataset")
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError(f"{what}={data!r} is a {type(data).__name__}, not data; load and tokenise it, then pass "
                        f"batches like {example} or a datasets.Dataset")
    datasets = sys.modules.get("datasets")  # a Dataset can only come from an imported datasets
    if datasets is not None and isinstance(data, datasets.IterableDataset):
        raise TypeError(f"{what} is a datasets.IterableDataset, which yields single examples, not batches; wrap it "
                        "in a torch DataLoader with a batch_size and collate_fn, or pass a datasets.Dataset")
    if datasets is not None and isinstance(data, datasets.Dataset):
        _check_dataset(model, data, tokenizer, what)
        return data
    if isinstance(data, Mapping):
        if datasets is not None and isinstance(data, datasets.DatasetDict):
            raise TypeError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. "
                            f"{what}=data[{next(iter(data), 'train')!r}]")
        raise TypeError(f"{what} is a single batch (a {type(data).__name__} with keys {list(data)}); pass an "
                        f"iterable of batches, e.g. [batch]")
    if not isinstance(data, Iterable):
        raise TypeError(f"{what} must be None, an iterable of batches like {example} or a tokenised "
                        f"datasets.Dataset; got {type(data).__name__} {data!r:.60}")
    if iter(data) is data:
        data = list(data)
    first = next(iter(data), None)
    if first is None:
        raise ValueError(f"{what} is empty ({type(data).__name__} with no batches); pass at least one batch, or None "
                         "for a data-free criterion")
    check_batch(model, first, f"{what}[0]")
    return data


def check_batch(model: nn.Module | None, batch, where: str = "batch") -> None:
    """One batch against ``model``'s inputs: the inputs it needs are there (a hint when text stands in for token
    ids), ``label`` is not mistaken for ``labels``, token ids and class labels are in range."""
    main = _main_input(model)
    if not isinstance(batch, Mapping):
        shape = f" of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else ""
        raise TypeError(f"{where} is a {type(batch).__name__}{shape}; a batch is a dict of model inputs like "
                        f"{{'{main}': tensor, 'attention_mask': tensor}}")
    text = [key for key, value in batch.items()
            if isinstance(value, str) or isinstance(value, (list, tuple)) and value and isinstance(value[0], str)]
    if model is None:
        return
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if "label" in batch and "label" not in params:  # the model would ignore it and score without labels
        raise ValueError(f"{where} has a 'label' key, which {name}.forward does not take; rename it 'labels' (as "
                         "the Trainer does)")
    required = [n for n, p in params.items() if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    needed = list(dict.fromkeys([main, *required]))
    missing = [n for n in needed if n not in batch and not (n == "input_ids" and "inputs_embeds" in batch)]
    if missing:
        either = " (or 'inputs_embeds')" if missing == ["input_ids"] else ""
        # extra keys are ignored by the models' **kwargs, so text next to input_ids is harmless; text instead of
        # them is the usual mistake
        hint = (f"; {text} hold text: tokenise it (tokenizer(texts, padding=True, return_tensors='pt'))"
                if text else "")
        raise ValueError(f"{where} has keys {sorted(batch)}, but {name} needs {missing}{either}{hint}")
    vocab = _vocab_size(model)
    ids = batch.get("input_ids")
    if ids is not None:
        ids = _as_tensor(ids, f"{where}['input_ids']")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{where}['input_ids'] has dtype {ids.dtype}; token ids are integers (torch.long)")
        if ids.dim() != 2:
            raise ValueError(f"{where}['input_ids'] has shape {tuple(ids.shape)}; a batch of token ids is "
                             "(batch, sequence): add the batch dimension (ids[None]) or stack the rows")
        _check_range(ids, f"{where}['input_ids']", vocab, "token id",
                     "the size of the model's input embeddings; was it tokenised for another model?")
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.numel():
        config = getattr(model, "config", None)
        if name.endswith("ForSequenceClassification") and getattr(config, "problem_type", None) in (
                None, "single_label_classification") and getattr(config, "num_labels", 0) > 1:
            _check_range(labels, f"{where}['labels']", config.num_labels, "label",
                         "the classifier's num_labels; -100 marks ignored rows", ignore=-100)
        elif name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            _check_range(labels, f"{where}['labels']", vocab, "token id",
                         "the size of the model's vocabulary; -100 marks ignored positions", ignore=-100)


def _check_dataset(model, data, tokenizer, what: str) -> None:
    import datasets

    if len(data) == 0:
        raise ValueError(f"the {what} dataset is empty (0 rows)")
    main = _main_input(model)
    columns = data.column_names
    if main == "input_ids" and "input_ids" not in columns and "inputs_embeds" not in columns:
        text = _text_column(data)
        if text is not None and tokenizer is not None:
            return  # calibration_batches tokenises it
        if text is not None or any(isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")
                                   for f in data.features.values()):
            raise ValueError(f"the {what} dataset is not tokenised: it has columns {columns} and no 'input_ids'; "
                             + _TOKENISE_HINT)
    keep = [n for n, f in data.features.items() if _numeric(f)]
    row = data.select_columns(keep)[:1] if keep else {}
    check_batch(model, {"labels" if k == "label" else k: v for k, v in row.items()}, f"the {what} dataset's row 0")


def _main_input(model) -> str:
    return getattr(model, "main_input_name", None) or "input_ids"


def _vocab_size(model) -> int | None:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # time-series models have no token embeddings
        return None
    return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None


def _as_tensor(value, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where} is a {type(value).__name__} that is not a rectangular array of numbers; pad the "
                         "rows to one length (or pass a tokenizer to collate them)") from None


def _check_range(values: torch.Tensor, where: str, size: int | None, unit: str, what: str,
                 ignore: int | None = None) -> None:
    if ignore is not None:
        values = values[values != ignore]
    if not values.numel():
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or (size is not None and high >= size):
        bad = low if low < 0 else high
        bound = f"[0, {size})" if size is not None else ">= 0"
        raise ValueError(f"{where} has {unit} {bad}, outside {bound} ({what})")

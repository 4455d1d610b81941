# Copyright hfprune contributors. Apache-2.0.
"""Calibration data and passes over it: batching (a list, a DataLoader or a ``datasets.Dataset``) and checks of the
batches against the model's inputs, device moves, token rows without padding, hooked passes and single-block
captures, and the cross-rank reduction that makes every process select the same plan.

Shared by the criteria, the recovery steps (mask tuning, bias compensation, OBS) and depth pruning, which all read
a model's activations on calibration tokens. It imports only torch, transformers and hfprune's core modules;
``datasets`` is read from ``sys.modules`` (a ``Dataset`` can only come from an imported ``datasets``).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .blocks import iter_blocks


class Stop(Exception):
    """Raised from a hook to end a forward pass once the block of interest has run."""


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def iterate(batches, desc: str):
    """``batches`` (see :func:`calibration_batches`) with a progress bar that goes away when done."""
    batches = calibration_batches(batches)
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, leave=False)


def token_rows(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """``x`` (batch, seq, features) as (tokens, features) rows, without the padding positions of ``batch``'s
    attention mask (when the mask matches ``x``'s leading shape; other inputs keep every row)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        x = x[mask.to(x.device).bool()]  # a model split over devices: the mask stays on the first
    return x.reshape(-1, x.shape[-1])


def first_examples(batches: list, limit: int | None) -> list:
    """The leading batches holding ``limit`` examples (the last one cut), or all of them."""
    if limit is None:
        return batches
    out, seen = [], 0
    for batch in batches:
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        take = min(size, limit - seen)
        if take <= 0:
            break
        out.append(batch if take == size else
                   {k: v[:take] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v
                    for k, v in batch.items()})
        seen += take
    return out


def device_batches(model: nn.Module, batches: Iterable, max_examples: int | None = None) -> list:
    """``batches`` (model-ready dicts) as a list on the model's device, cut to the first ``max_examples``; a
    ``ValueError`` when that leaves none. Passes that run the model more than once need the list."""
    device = next(model.parameters()).device
    out = first_examples([to_device(b, device) for b in batches], max_examples)
    if not out:
        raise ValueError("the calibration data is empty")
    return out


def capture(model: nn.Module, module: nn.Module, batch: dict, what: str) -> torch.Tensor:
    """The input (``what='input'``) or output of ``module`` in one forward pass of ``model``, stopping there."""
    seen = {}

    def pre_hook(_m, args, kwargs):
        seen["t"] = (args[0] if args else kwargs["input"]).detach()
        raise Stop

    def hook(_m, _args, output):
        seen["t"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise Stop

    # with_kwargs pre-hooks run after the masks' gate hook (registered earlier) in registration order: the
    # captured input of a gated projection is read after its gate
    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True) if what == "input" \
        else module.register_forward_hook(hook)
    try:
        model(**batch)
    except Stop:
        pass
    finally:
        handle.remove()
    if "t" not in seen:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward pass")
    return seen["t"]


# -- hooked passes and cross-rank reduction ----------------------------------------------------


def watch_output_projections(model, make_hook) -> list:
    """A forward pre-hook ``make_hook(block key, units, module)(module, args)`` on the output projection of every
    attention block (units: heads) and FFN (units: neurons) that still has units; returns the handles."""
    handles = []
    for block in iter_blocks(model):
        units = block.units
        if units and not block.is_expert:  # an emptied block has nothing to watch; routed experts no projection
            module = block.output_projection()
            handles.append(module.register_forward_pre_hook(make_hook(block.key, units, module)))
    return handles


def watched_pass(model, batches, make_hook, what: str, current: dict | None = None) -> None:
    """One no-grad pass over ``batches`` with :func:`watch_output_projections` hooks, removed afterwards even on
    error; ``current["batch"]`` holds the batch being run, for hooks that need its attention mask."""
    hooked_pass(model, batches, watch_output_projections(model, make_hook), what, current)


def hooked_pass(model, batches, handles: list, what: str, current: dict | None = None) -> None:
    """One no-grad pass over ``batches`` with the hooks behind ``handles`` in place, removed afterwards even on
    error; ``current["batch"]`` holds the batch being run (on the model's device)."""
    device = next(model.parameters()).device
    current = {} if current is None else current
    try:
        with torch.no_grad():
            for batch in iterate(batches, what):
                current["batch"] = to_device(batch, device)
                model(**current["batch"])
    finally:
        for h in handles:
            h.remove()


def reduce_across_processes(scores: dict) -> dict:
    """Sum scores over torch.distributed ranks, so every rank selects the same plan."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for key in sorted(scores):
            torch.distributed.all_reduce(scores[key], op=torch.distributed.ReduceOp.SUM)
    return scores


# -- batching ----------------------------------------------------------------------------------


def calibration_batches(data, batch_size: int = 32, tokenizer=None, collate_fn=None):
    """Model-ready batches from a DataLoader, a list (or other iterable) of dicts, or a ``datasets.Dataset``.

    A ``Dataset`` of tokenised columns is batched in order (``batch_size`` rows) and collated with ``collate_fn``,
    else ``DataCollatorWithPadding(tokenizer)`` when a tokenizer is given, else :func:`stack_features`. Columns
    that are not numbers (the raw ``text``) are left out; ``label`` becomes ``labels`` as the Trainer does. A
    dataset with no ``input_ids`` but a text column (``text``, or its only string column) is tokenised batch by
    batch when a tokenizer is given. Anything else is returned as it is.
    """
    datasets = sys.modules.get("datasets")  # optional: a Dataset can only come from an imported datasets
    if datasets is None or not isinstance(data, datasets.Dataset):
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
    datasets = sys.modules["datasets"]  # only reached for a Dataset
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
    datasets = sys.modules["datasets"]  # only reached for a Dataset
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


# -- checks ----------------------------------------------------------------------------------------


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
    datasets = sys.modules["datasets"]  # only reached for a Dataset
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

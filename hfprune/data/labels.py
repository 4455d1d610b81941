# Copyright hfprune contributors. Apache-2.0.
"""Class labels written as words ("negative", "neutral", "positive"): one id per label, the same for every split,
and the names in the model's config (``id2label`` / ``label2id``) so that its saved config.json carries them.

Example:

```python
>>> import datasets
>>> from hfprune.data.labels import encode_labels
>>> raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": ["pos", "neg", "pos"]}),
...                            test=datasets.Dataset.from_dict({"label": ["neg"]}))
>>> data, names = encode_labels(raw, "label")
>>> names, list(data["train"]["label"]), list(data["test"]["label"])
(['neg', 'pos'], [1, 0, 1], [0])
```
"""

from __future__ import annotations


def default_names(config) -> bool:
    """Whether ``config.id2label`` holds only transformers' placeholders (``LABEL_0``, ...), i.e. no names."""
    id2label = getattr(config, "id2label", None) or {}
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def label_names(raw, column: str, train_split: str = "train") -> list | None:
    """The sorted label strings of ``train_split``, or ``None`` when ``column`` holds numbers (ids, or floats for
    a regression). A label of another split that the train split lacks is refused, naming it."""
    train = raw[train_split]
    if not _is_text(train.features[column]):
        return None
    values = list(train[column])
    names = sorted({str(v) for v in values if v is not None})
    if None in values:
        raise ValueError(f"data.label_column {column!r}: split {train_split!r} has rows without a label")
    for split, rows in raw.items():
        if split == train_split:
            continue
        unseen = sorted({str(v) for v in list(rows[column])} - set(names))
        if unseen:
            raise ValueError(f"data.label_column {column!r}: split {split!r} has label(s) {unseen} that the "
                             f"{train_split!r} split lacks (it has {names}); a model cannot learn or be scored on "
                             "them")
    return names


def label_ids(names: list, config=None) -> dict:
    """``{name: id}`` for the label ``names``: the sorted order, or the model's own ``id2label`` when its config
    names its labels (a fine-tuned head keeps the meaning of its outputs). Refused: more labels than the head has
    outputs, or labels the model's names do not include."""
    if config is None:
        return {name: i for i, name in enumerate(names)}
    num = getattr(config, "num_labels", len(names))
    if not default_names(config):
        known = {str(name): int(i) for i, name in config.id2label.items()}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"data.label_column: label(s) {missing} are not among the model's labels "
                             f"{sorted(known, key=known.get)} (its config's id2label)")
        return {name: known[name] for name in names}
    if num != len(names):
        raise ValueError(f"the data has {len(names)} labels {names}, but the model's head has {num} output(s) "
                         f"(num_labels); set model.num_labels: {len(names)} for a new head")
    return {name: i for i, name in enumerate(names)}


def encode_labels(raw, column: str, train_split: str = "train", config=None) -> tuple:
    """``(data, names)``: ``raw`` with the word labels of ``column`` replaced by ids (:func:`label_ids`), and the
    names by id; ``(raw, None)`` when the labels are numbers already. With ``config`` (the model's), the names
    are written into its ``id2label`` / ``label2id``."""
    names = label_names(raw, column, train_split)
    if names is None:
        feature = raw[train_split].features[column]
        class_names = list(getattr(feature, "names", None) or [])  # a datasets ClassLabel: ids that have names
        if class_names and config is not None and default_names(config) and config.num_labels == len(class_names):
            set_names(config, {name: i for i, name in enumerate(class_names)})
        return raw, class_names or None
    import datasets

    ids = label_ids(names, config)
    data = {}
    for split, rows in raw.items():
        features = rows.features.copy()
        features[column] = datasets.Value("int64")  # map alone would keep the string type and write "0"
        data[split] = rows.map(lambda batch: {column: [ids[str(v)] for v in batch[column]]}, batched=True,
                               features=features, desc="label ids")
    data = datasets.DatasetDict(data)
    if config is not None:
        set_names(config, ids)
    return data, sorted(ids, key=ids.get)


def set_names(config, ids: dict) -> None:
    """Write ``{name: id}`` into ``config`` as transformers keeps it (``id2label`` keyed by int)."""
    config.label2id = {name: int(i) for name, i in ids.items()}
    config.id2label = {int(i): name for name, i in ids.items()}

# Copyright hfprune contributors. Apache-2.0.
"""Your own data as train / validation / test rows: local files (the format from their extension) or a datasets
name or folder. A recipe names it ``data.loader: hfprune.data.rows:load_rows`` (its keyword arguments in
``data.kwargs``); ``hfprune prune --data_files / --dataset`` builds that section.

Data that come as one split (one file, several files of one pool, or ``split:`` of a dataset) are cut into
``train`` / ``validation`` / ``test`` (80/10/10 unless ``fractions`` says otherwise) so that nothing leaks:

* with ``time_column``: sorted by time and cut into consecutive spans (a forecaster is scored on a later span);
* text files: each file is one document when there are at least three, shuffled by file; fewer files are cut
  into paragraphs (blank-line separated) and split into consecutive stretches, so neighbouring text stays on one
  side;
* otherwise rows are shuffled with ``seed`` and cut.

Example:

```python
>>> import tempfile, pathlib
>>> from hfprune.data.rows import load_rows
>>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
>>> _ = path.write_text("text,label\\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\\n" for i in range(20)))
>>> data = load_rows(files=str(path))
>>> {name: split.num_rows for name, split in data.items()}
{'train': 16, 'validation': 2, 'test': 2}
```
"""

from __future__ import annotations

import os

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# a text pool needs one document per split at least to split by document
MIN_DOCUMENTS = 3


def file_format(paths: list) -> str:
    """The datasets builder for ``paths`` (csv, json, parquet, text), from their extensions, which must agree."""
    formats = {}
    for path in paths:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in SUFFIXES:
            raise ValueError(f"{path!r}: cannot tell the format from {suffix or 'no extension'!r}; name the file "
                             f"{' / '.join(SUFFIXES)} or give format= (csv, json, parquet, text)")
        formats.setdefault(SUFFIXES[suffix], path)
    if len(formats) > 1:
        raise ValueError(f"the files mix formats {sorted(formats)} ({', '.join(map(repr, formats.values()))}); "
                         "give files of one format")
    return next(iter(formats))


def data_file_paths(files) -> tuple:
    """``files`` -> (``{split: [paths]}`` or ``None``, every path): a path, a list of paths, or a split mapping."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if isinstance(files, dict):
        splits = {str(k): [os.fspath(p) for p in ([v] if isinstance(v, (str, os.PathLike)) else v)]
                  for k, v in files.items()}
    elif isinstance(files, (list, tuple)) and files:
        splits = None
    else:
        raise ValueError(f"files={files!r}: give a path, a list of paths or a mapping split -> path(s)")
    paths = [p for ps in splits.values() for p in ps] if splits else [os.fspath(p) for p in files]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        if not os.path.isfile(path):
            raise IsADirectoryError(f"data file {path!r} is a directory; give the files in it")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty")
    return splits, paths


def header(paths: list, format: str, load_kwargs: dict) -> list:
    """The column names of the first of ``paths`` that has any (for an error about files without rows)."""
    import csv

    for path in paths:
        if format == "csv":
            with open(path, newline="", encoding="utf-8") as f:
                first = next(csv.reader(f, delimiter=load_kwargs.get("sep", ",")), [])
        elif format == "parquet":
            import pyarrow.parquet as pq

            first = pq.read_schema(path).names
        else:
            first = ["text"] if format == "text" else []
        if first:
            return first
    return []


def cut(n: int, fractions: dict | None = None) -> dict:
    """``{split: (start, end)}``: ``n`` rows cut into consecutive parts by ``fractions`` (pure); every part gets at
    least one row and ``train`` takes what the others leave."""
    fractions = dict(FRACTIONS if fractions is None else fractions)
    if "train" not in fractions or any(not 0 < f < 1 for f in fractions.values()) \
            or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions={fractions!r}: give numbers in (0, 1) summing to 1, one of them 'train'")
    if n < len(fractions):
        raise ValueError(f"{n} row(s) are too few to split into {list(fractions)}; give more data")
    sizes = {name: max(1, round(f * n)) for name, f in fractions.items() if name != "train"}
    sizes["train"] = n - sum(sizes.values())
    if sizes["train"] < 1:
        raise ValueError(f"{n} rows leave none for train with fractions={fractions!r}")
    order = ["train"] + [name for name in fractions if name != "train"]
    bounds, start = {}, 0
    for name in order:
        bounds[name] = (start, start + sizes[name])
        start += sizes[name]
    return bounds


def load_rows(seed: int = 0, files=None, dataset: str | None = None, config: str | None = None,
              split: str | None = None, format: str | None = None, time_column: str | None = None,
              fractions: dict | None = None, **load_kwargs):
    """A ``datasets.DatasetDict`` of ``train`` / ``validation`` / ``test`` rows from ``files`` (a path, paths, or
    ``{split: path(s)}`` kept as given) or ``dataset`` (a datasets name or folder, with ``config`` and
    ``split``); one split is cut as the module says. Every split must have rows; ``time_column`` must exist."""
    import datasets

    if (files is None) == (dataset is None):
        raise ValueError("give exactly one of files= (local files) or dataset= (a datasets name or folder)")
    pooled_text = False
    if files is not None:
        splits, paths = data_file_paths(files)
        format = format or file_format(paths)
        if format == "text":
            pooled_text = splits is None and len(paths) < MIN_DOCUMENTS
            load_kwargs.setdefault("sample_by", "paragraph" if pooled_text else "document")
        if format == "csv" and all(p.lower().endswith(".tsv") for p in paths):
            load_kwargs.setdefault("sep", "\t")
        source = ", ".join(map(repr, paths))
        try:
            loaded = datasets.load_dataset(format, data_files=splits or {"train": paths}, **load_kwargs)
        except ValueError as err:
            if "corresponds to no data" not in str(err):  # datasets' words for a split without rows
                raise
            raise ValueError(f"{source}: no rows (columns found: {header(paths, format, load_kwargs)})") from None
    else:
        loaded = datasets.load_dataset(dataset, config, split=split, **load_kwargs)
        source = repr(dataset) + (f" (split {split!r})" if split else "")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    for name, rows in loaded.items():
        if rows.num_rows == 0:
            raise ValueError(f"{source}: split {name!r} holds no rows (columns found: {rows.column_names})")
        if time_column is not None and time_column not in rows.column_names:
            raise ValueError(f"time_column {time_column!r} is not a column of {source}; its columns are "
                             f"{rows.column_names}")
    if len(loaded) > 1:
        return loaded
    pool = next(iter(loaded.values()))
    if time_column is not None:
        from .forecast_rows import parse_times

        pool = pool.select(parse_times(list(pool[time_column]), time_column).argsort(kind="stable").tolist())
    elif not pooled_text:
        pool = pool.shuffle(seed=seed)
    return datasets.DatasetDict({name: pool.select(range(start, end))
                                 for name, (start, end) in cut(pool.num_rows, fractions).items()})

# Copyright hfprune contributors. Apache-2.0.
"""Forecasting windows from your own rows (a CSV, parquet or datasets table): a time column, the target columns
and optional covariate columns, cut into the windows a given forecaster reads.

The splits the rows come in (``train``, ``validation``, ``test``, in that order in time) become consecutive spans
of one series; :func:`hfprune.data.timeseries.forecast_windows` then cuts windows whose forecast horizon lies in a
span, so no train window sees a value of a later span, and scales with train statistics only.

Example:

```python
>>> import datasets
>>> import transformers
>>> from hfprune.data.forecast_rows import model_windows
>>> rows = {"time": [f"2024-01-01 {h:02d}:00" for h in range(24)], "load": [float(h) for h in range(24)]}
>>> splits = {"train": datasets.Dataset.from_dict({k: v[:16] for k, v in rows.items()}),
...           "test": datasets.Dataset.from_dict({k: v[16:] for k, v in rows.items()})}
>>> config = transformers.PatchTSTConfig(num_input_channels=1, context_length=8, prediction_length=4)
>>> data = model_windows(splits, config, time_column="time", target_columns=["load"])
>>> data.dataset["test"].num_rows, data.bounds
(2, {'train': (0, 16), 'test': (16, 24)})
```
"""

from __future__ import annotations

import warnings

import numpy as np

from .timeseries import (
    FAMILIES,
    NUM_TIME_FEATURES,
    PATCH_FAMILIES,
    SEQ2SEQ_FAMILIES,
    ForecastWindows,
    TimeSeries,
    forecast_windows,
    past_length_for,
)


def _columns(names, what: str) -> list:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"data.{what}={names!r}: give a list of column names")
    if len(set(names)) != len(names):
        raise ValueError(f"data.{what}={list(names)} names a column twice")
    return list(names)


def _number_column(split: str, column: list, name: str, what: str) -> np.ndarray:
    try:
        values = np.asarray([np.nan if v is None else v for v in column], dtype=np.float32)
    except (TypeError, ValueError):
        example = next((v for v in column if not _is_number(v)), None)
        raise ValueError(f"data.{what}: column {name!r} of split {split!r} holds {example!r}, not a number") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(f"data.{what}: column {name!r} of split {split!r} is missing or not finite in {len(bad)} "
                         f"row(s), the first at row {int(bad[0])}; fill or drop them first")
    return values


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_times(values: list, column: str, split: str | None = None) -> np.ndarray:
    """The times in ``values`` (strings in any format pandas reads, datetimes) as ``datetime64[s]`` (UTC when a
    zone is given); a value that is not a time is refused, naming ``column`` (of ``split``) and the row."""
    import pandas as pd

    where = f"column {column!r}" + (f" of split {split!r}" if split else "")
    try:
        with warnings.catch_warnings():  # "could not infer format": each value parsed on its own, as meant
            warnings.simplefilter("ignore", UserWarning)
            stamps = pd.to_datetime(pd.Series(values), utc=True).dt.tz_localize(None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.time_column: {where} is not a date/time column ({str(err).splitlines()[0]})") \
            from None
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise ValueError(f"data.time_column: {where} has no time in row {row}")
    return stamps.to_numpy().astype("datetime64[s]")


def time_step(rows, time_column: str) -> str | None:
    """The sampling frequency of ``rows`` (a table with ``time_column``) as a pandas offset alias (``h``,
    ``30min``, ``D``), or ``None`` when the times have none (fewer than three, or irregular: cutting such rows into
    windows is refused with the reason)."""
    import pandas as pd

    if time_column not in (rows.column_names if hasattr(rows, "column_names") else list(rows)):
        return None
    stamps = np.unique(parse_times(list(rows[time_column]), time_column))
    if len(stamps) < 3:
        return None
    with warnings.catch_warnings():  # pandas 3 announces an offset instead of a string: take either
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(pd.DatetimeIndex(stamps))
    return getattr(freq, "freqstr", freq)


def rows_to_series(splits: dict, time_column: str, target_columns: list, covariate_columns: list | None = None,
                   train_split: str = "train") -> tuple:
    """``{split: rows}`` (each a ``datasets.Dataset`` or a dict of columns) -> ``(series, bounds)``: one
    :class:`TimeSeries` (each split sorted by time, the splits ordered by time) and each split's ``(start, end)``
    steps in it.

    Refused, naming the column (and the columns found): a missing column, a value that is not a number or is
    missing, a time that does not parse, a time given twice, splits that overlap in time, a split earlier than
    ``train_split`` (training would read it as past), and gaps (the windows assume one regular step throughout).
    """
    targets = _columns(target_columns, "target_columns")
    covariates = _columns(covariate_columns or [], "covariate_columns")
    if not isinstance(time_column, str) or not time_column:
        raise ValueError(f"data.time_column={time_column!r}: give the name of the column holding the times")
    if set(targets) & set(covariates) or time_column in targets + covariates:
        raise ValueError(f"data.time_column={time_column!r}, target_columns={targets} and covariate_columns="
                         f"{covariates} must name different columns")
    if not splits:
        raise ValueError("no splits to build a series from")
    parts = []  # (split, times, values, covariates), sorted by time
    for split, table in splits.items():
        found = list(table.column_names if hasattr(table, "column_names") else table)
        for what, names in (("time_column", [time_column]), ("target_columns", targets),
                            ("covariate_columns", covariates)):
            missing = [n for n in names if n not in found]
            if missing:
                raise ValueError(f"data.{what}: column(s) {missing} not in split {split!r}; its columns are {found}")
        column = {name: list(table[name]) for name in [time_column, *targets, *covariates]}
        n = len(column[time_column])
        if n == 0:
            raise ValueError(f"split {split!r} has no rows (columns found: {found})")
        stamps = parse_times(column[time_column], time_column, split)
        order = np.argsort(stamps, kind="stable")
        parts.append((split, stamps[order],
                      np.stack([_number_column(split, column[c], c, "target_columns") for c in targets], -1)[order],
                      np.stack([_number_column(split, column[c], c, "covariate_columns") for c in covariates],
                               -1)[order] if covariates else None))
    parts.sort(key=lambda part: part[1][0])
    if train_split in splits and parts[0][0] != train_split:
        first = parts[0]
        raise ValueError(f"data.time_column {time_column!r}: split {first[0]!r} starts at {first[1][0]}, before the "
                         f"{train_split!r} split; train must be the earliest span, or training would read later "
                         "values as its past")
    for (a, ta, _, _), (b, tb, _, _) in zip(parts, parts[1:]):
        if tb[0] <= ta[-1]:
            raise ValueError(f"data.time_column {time_column!r}: split {b!r} starts at {tb[0]}, before split {a!r} "
                             f"ends ({ta[-1]}); the splits must follow each other in time (train, validation, test), "
                             "or a later value would be known in training")
    bounds, start = {}, 0
    for split, stamps, _, _ in parts:
        bounds[split] = (start, start + len(stamps))
        start += len(stamps)
    stamps = np.concatenate([part[1] for part in parts])
    steps = np.diff(stamps).astype(np.int64)
    if len(steps) and (steps == 0).any():
        at = stamps[int(np.flatnonzero(steps == 0)[0])]
        raise ValueError(f"data.time_column {time_column!r}: the time {at} appears twice; give one row per time")
    if len(steps) and (steps != steps[0]).any():
        i = int(np.flatnonzero(steps != steps[0])[0])
        raise ValueError(f"data.time_column {time_column!r}: the series is not regular: {stamps[i]} -> "
                         f"{stamps[i + 1]} after steps of {int(steps[0])} s; fill the gap (windows assume one "
                         "step throughout)")
    freq = f"{int(steps[0])}s" if len(steps) else "unknown"
    series = TimeSeries(np.concatenate([part[2] for part in parts]), stamps, tuple(targets), freq,
                        np.concatenate([part[3] for part in parts]) if covariates else None, tuple(covariates))
    return series, bounds


def model_windows(splits: dict, config, time_column: str, target_columns: list,
                  covariate_columns: list | None = None, train_split: str = "train") -> ForecastWindows:
    """Windows of the rows in ``splits`` (consecutive spans of time, ``train_split`` the first) as the forecaster
    ``config`` reads them: its ``context_length`` of past (plus its largest lag for the seq2seq families) and its
    ``prediction_length`` (TimesFM: ``horizon_length``) ahead. Train windows advance one step; the others by the
    horizon, so every later step is forecast once.

    The targets are the model's channels; covariates go to the time features, which only the seq2seq families
    read (``num_dynamic_real_features``). A mismatch with the model is refused, naming the columns.
    """
    family = config.model_type
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not a supported forecaster; supported: {FAMILIES}")
    targets = _columns(target_columns, "target_columns")
    covariates = _columns(covariate_columns or [], "covariate_columns")
    if train_split not in splits:
        raise ValueError(f"no {train_split!r} split among {list(splits)}: the scaling is fitted on it")
    if family in PATCH_FAMILIES:
        wanted = config.num_input_channels
        if len(targets) != wanted:
            raise ValueError(f"data.target_columns={targets}: {len(targets)} column(s), but the {family} model "
                             f"reads {wanted} channel(s) (num_input_channels)")
    elif family in SEQ2SEQ_FAMILIES and len(targets) != config.input_size:
        raise ValueError(f"data.target_columns={targets}: {len(targets)} column(s), but the {family} model reads "
                         f"{config.input_size} series (input_size)")
    if family in SEQ2SEQ_FAMILIES:
        reads = config.num_time_features + getattr(config, "num_dynamic_real_features", 0)
        if reads != NUM_TIME_FEATURES + len(covariates):
            raise ValueError(f"data.covariate_columns={covariates}: the {family} model reads {reads} time features "
                             f"(num_time_features + num_dynamic_real_features), and the rows give "
                             f"{NUM_TIME_FEATURES} from the time column + {len(covariates)} covariate(s)")
    elif covariates:
        raise ValueError(f"data.covariate_columns={covariates}: a {family} model reads no covariates (only the "
                         f"seq2seq families {SEQ2SEQ_FAMILIES} do); list them in target_columns to feed them as "
                         "channels, or leave them out")
    horizon = getattr(config, "prediction_length", None) or config.horizon_length
    series, bounds = rows_to_series(splits, time_column, targets, covariates, train_split)
    strides = {name: 1 if name == train_split else horizon for name in bounds}
    past = past_length_for(config)
    try:
        return forecast_windows(series, config.context_length, horizon, extra_past=past - config.context_length,
                                strides=strides, bounds=bounds, fit_on=train_split)
    except ValueError as err:
        if "too short" not in str(err):
            raise
        sizes = {name: end - start for name, (start, end) in bounds.items()}
        raise ValueError(f"{err}: the splits hold {sizes} time steps; each needs at least the horizon "
                         f"({horizon}) after the model's {past} steps of past") from None

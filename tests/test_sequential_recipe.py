"""The recipe ``model`` section takes the layer-by-layer path as ``hfprune prune`` does (the same choice function):
``model.sequential`` true / false / null, ``model.dtype`` and ``model.offload_dir``; the log says which path ran
and why, and a setting the path cannot run is refused before anything is written."""

import json
import logging
import random

import pytest
import torch

import hfprune
from hfprune.pipeline.recipe import RecipeError, load_recipe
from hfprune.pipeline.run import run

from .test_own_data import tiny_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-lm")
    model_dir = tiny_lm(root / "lm")
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"t{rng.randint(3, 63)}" for _ in range(40)) for _ in range(20)) + "\n")
    return model_dir, text


def _recipe(lm, out, model=None, pruning=None):
    model_dir, text = lm
    return load_recipe({
        "name": "seq", "method": "oneshot",
        "model": {"path": str(model_dir), "task": "causal-lm", **(model or {})},
        "data": {"loader": "hfprune.data.rows:load_rows", "kwargs": {"files": [str(text)]}, "text_column": "text",
                 "max_length": 16, "calibration_samples": 6, "calibration_batch_size": 4},
        "pruning": {"criterion": "fluctuation", "params_ratio": 0.8, "scope": "uniform", "recovery": "obs",
                    "seq_len": 16, **(pruning or {})},
        "evaluation": {"latency": False, "metrics": []},
        "output": {"dir": str(out), "plots": False, "card": False},
    })


def test_recipe_sequential_equals_in_memory(lm, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hfprune")
    seq = run(_recipe(lm, tmp_path / "seq", {"sequential": True}))
    assert "layer-by-layer path: model.sequential: true" in caplog.text
    mem = run(_recipe(lm, tmp_path / "mem", {"sequential": False}))
    assert "in-memory path: model.sequential: false" in caplog.text
    assert seq.results["path"] == "sequential" and seq.output_dir == tmp_path / "seq"
    assert json.loads((tmp_path / "seq" / "prune_plan.json").read_text()) == \
        json.loads((tmp_path / "mem" / "prune_plan.json").read_text())
    a, b = hfprune.from_pretrained(tmp_path / "seq"), hfprune.from_pretrained(tmp_path / "mem")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert seq.results["params"] == mem.results["params"]


def test_recipe_auto_follows_the_cli_choice(lm, tmp_path, caplog, monkeypatch):
    import hfprune.pipeline.sequential_run as sequential_run

    caplog.set_level(logging.INFO, logger="hfprune")
    run(_recipe(lm, tmp_path / "small"))  # null: the tiny model fits, so in memory, and the log says why
    assert "in-memory path: the weights" in caplog.text and "fit in memory" in caplog.text
    monkeypatch.setattr(sequential_run, "available_memory", lambda: 10_000)  # bytes: far less than the weights
    out = run(_recipe(lm, tmp_path / "big"))
    assert "layer-by-layer path: the weights" in caplog.text and out.results["path"] == "sequential"
    mem = run(_recipe(lm, tmp_path / "nosave"), save=False)  # writes as it goes: a run without saving stays
    assert "this run does not save" in caplog.text and mem.output_dir is None
    run(_recipe(lm, tmp_path / "bf16", {"dtype": "bfloat16"}))  # a dtype means layer by layer, as --dtype does
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("model, pruning, words", [
    ({"sequential": True}, {"criterion": "fisher", "recovery": "none"},
     "model.sequential: true: criterion 'fisher' reads gate gradients"),
    ({"offload_dir": "FILE"}, {}, "offload_dir="),
    ({"dtype": "bfloat16"}, {"criterion": "fisher", "recovery": "none"},  # a dtype asks for layer by layer
     "model.dtype / model.offload_dir (layer by layer only): criterion 'fisher'"),
])
def test_recipe_errors_before_anything_is_written(lm, tmp_path, model, pruning, words):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    model = {k: str(blocker) if v == "FILE" else v for k, v in model.items()}
    out = tmp_path / "out"
    with pytest.raises((ValueError, NotADirectoryError)) as err:
        run(_recipe(lm, out, model, pruning))
    assert words in str(err.value), str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("model, words", [
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"sequential": False, "offload_dir": "x"}, "sequential is false"),
    ({"sequential": "yes"}, "model.sequential: expected bool | None"),
])
def test_recipe_model_keys_are_checked_on_load(lm, tmp_path, model, words):
    with pytest.raises(RecipeError, match=words.replace("|", r"\|")):
        _recipe(lm, tmp_path / "out", model)

"""``hfprune prune`` layer by layer: the same checkpoint as the in-memory run from the same flags, the path it took
in the log, and clear errors before anything is written."""

import json
import logging
import random

import pytest
import torch

import hfprune
from hfprune.pipeline.cli import main

from .test_own_data import tiny_lm

FLAGS = ["--task", "causal-lm", "--criterion", "fluctuation", "--params_ratio", "0.8", "--scope", "uniform",
         "--recovery", "obs", "--calibration_samples", "6", "--seq_len", "16", "--calibration_batch_size", "4",
         "--latency", "false"]


@pytest.fixture
def lm(tmp_path):
    model_dir = tiny_lm(tmp_path / "lm")
    rng = random.Random(0)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"t{rng.randint(3, 63)}" for _ in range(40)) for _ in range(20)) + "\n")
    return model_dir, text


def test_sequential_equals_in_memory(lm, tmp_path, caplog):
    model_dir, text = lm
    caplog.set_level(logging.INFO, logger="hfprune")
    seq, mem = tmp_path / "seq", tmp_path / "mem"
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(seq), *FLAGS, "--data_files", str(text),
                 "--sequential"]) == 0
    assert "layer-by-layer path: --sequential" in caplog.text
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(mem), *FLAGS, "--data_files", str(text),
                 "--no-sequential"]) == 0
    assert "in-memory path: --no-sequential" in caplog.text
    assert json.loads((seq / "prune_plan.json").read_text()) == json.loads((mem / "prune_plan.json").read_text())
    a, b = hfprune.from_pretrained(seq), hfprune.from_pretrained(mem)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    results = json.loads((seq / "hfprune_results.json").read_text())
    assert results["path"] == "sequential" and results["params"]["after"] < results["params"]["before"]
    assert (seq / "tokenizer.json").exists() and (seq / "recipe.yaml").exists()


def test_auto_keeps_small_models_in_memory_and_says_why(lm, tmp_path, caplog):
    model_dir, text = lm
    caplog.set_level(logging.INFO, logger="hfprune")
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "a"), *FLAGS,
                 "--data_files", str(text)]) == 0
    assert "in-memory path: the weights" in caplog.text and "fit in memory" in caplog.text
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "b"), *FLAGS,
                 "--data_files", str(text), "--dtype", "bfloat16"]) == 0
    assert "layer-by-layer path: --sequential" in caplog.text
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("extra, words", [
    (["--criterion", "fisher"], "in-memory path"),
    (["--latency_ratio", "0.5", "--params_ratio", "None"], "latency_ratio"),
    (["--offload_dir", "FILE"], "offload_dir"),
    (["--dtype", "int8"], "dtype='int8'"),
    (["--seq_len", "60"], "lower data.max_length or give more text"),
])
def test_errors_before_anything_is_written(lm, tmp_path, capsys, extra, words):
    model_dir, text = lm
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    extra = [str(blocker) if e == "FILE" else e for e in extra]
    flags = list(FLAGS)
    if "--params_ratio" in extra:  # replaced, not added
        i = flags.index("--params_ratio")
        del flags[i:i + 2]
        extra = extra[:2]
    if "--seq_len" in extra:
        (tmp_path / "short.txt").write_text("t3 t4 t5\n\n" * 6)  # 18 tokens: not one block of 60
        text = tmp_path / "short.txt"
    out = tmp_path / "out"
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(out), *flags, *extra, "--data_files",
                 str(text), "--sequential"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets progress bars
    assert err.startswith("hfprune prune: error: ") and words in err, err
    assert not out.exists()


def test_auto_goes_layer_by_layer_when_the_weights_do_not_fit(lm, tmp_path, caplog, monkeypatch):
    import hfprune.pipeline.sequential_run as sequential_run

    model_dir, text = lm
    caplog.set_level(logging.INFO, logger="hfprune")
    monkeypatch.setattr(sequential_run, "available_memory", lambda: 10_000)  # bytes: a model far bigger than that
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "a"), *FLAGS,
                 "--data_files", str(text)]) == 0
    assert "layer-by-layer path: the weights" in caplog.text
    assert json.loads((tmp_path / "a" / "hfprune_results.json").read_text())["path"] == "sequential"
    flags = [f if f != "fluctuation" else "fisher" for f in FLAGS if f not in ("--recovery", "obs")]
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "b"), *flags,
                 "--data_files", str(text)]) == 0  # fisher cannot go layer by layer: in memory, and it says why
    assert "in-memory path: criterion 'fisher' reads gate gradients of the whole model" in caplog.text

"""The ``hfprune`` command end to end on a tiny BERT with a tiny tokenizer and CSV data (seconds, no assets)."""

import json
import random
import subprocess
import sys

import pytest
import torch
import transformers as T
import yaml

import hfprune
from hfprune.pipeline.cli import main

WORDS = [f"w{i}" for i in range(40)]


def make_tiny_model(root):
    """A tiny BERT classifier and a word-level tokenizer saved together; words 'good'/'bad' carry the label."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, max_position_embeddings=64, num_labels=2)
    model = T.BertForSequenceClassification(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def make_csv(root) -> dict:
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 48), ("validation", 16), ("test", 24)):
        rows = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(WORDS, 5) + ["good" if label else "bad"]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)},{label}")
        files[split] = str(root / f"{split}.csv")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return files


def tiny_recipe(root, **sections) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"path": str(make_tiny_model(root)), "task": "text-classification",
                  "base_model": "hf-internal-testing/tiny-bert"},
        "data": {"loader": "files", "format": "csv", "files": make_csv(root), "max_length": 16,
                 "calibration_samples": 16, "calibration_batch_size": 8},
        "pruning": {"criterion": "fisher", "macs_ratio": 0.5},
        "evaluation": {"metrics": ["accuracy", "f1"], "batch_size": 16, "latency_batch_size": 2,
                       "latency_seq_len": 8, "latency_rounds": 2},
        "output": {"dir": str(root / "out")},
    }
    recipe.update(sections)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """``hfprune run`` once; the tests below inspect what it printed and wrote."""
    root = tmp_path_factory.mktemp("cli")
    path = tiny_recipe(root)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", str(path), "--pruning.macs_ratio=0.5", "--evaluation.latency_rounds", "3"])
    return rc, out.getvalue(), root / "out", root


def test_run_prints_before_after_table(ran):
    rc, text, out, _ = ran
    assert rc == 0
    for row in ("test accuracy", "test f1", "parameters", "MACs, transformer layers", "latency, batch 2 x 8"):
        assert row in text, row
    results = json.loads((out / "hfprune_results.json").read_text())
    assert results["macs"]["after"] <= 0.5 * results["macs"]["before"]
    assert results["latency"]["rounds"] == 3  # the override reached the run
    assert set(results["metrics"]["before"]) == {"accuracy", "f1"}


def test_run_writes_a_checkpoint_that_reloads(ran):
    _, _, out, _ = ran
    for name in ("config.json", "model.safetensors", "modeling_hfprune.py", "prune_plan.json", "README.md",
                 "recipe.yaml", "importance.safetensors", "tokenizer.json", "plots/kept_structure.png",
                 "plots/importance.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "hfprune_results.json").read_text())
    model = T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == results["params"]["after"]
    assert (out / "plots/kept_structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".hfprune-staging-")]


def test_report_prints_layers_and_draws(ran, capsys):
    _, _, out, root = ran
    assert main(["report", str(out), "--out", str(root / "plots")]) == 0
    text = capsys.readouterr().out
    assert "| layer 0 |" in text and "| layer | heads | ffn |" in text
    assert (root / "plots" / "kept_structure.png").stat().st_size > 1000


def test_prune_command_data_free(ran, capsys, tmp_path):
    _, _, _, root = ran
    rc = main(["prune", "--model_dir", str(root / "model"), "--output_dir", str(tmp_path / "p"),
               "--criterion", "magnitude", "--head_ratio", "0.5", "--ffn_ratio", "0.5", "--latency", "false"])
    assert rc == 0
    plan = json.loads((tmp_path / "p" / "prune_plan.json").read_text())
    assert [len(layer["heads"]) for layer in plan["layers"]] == [2, 2]
    assert "parameters" in capsys.readouterr().out


def test_prune_command_rejects_missing_budget(ran, tmp_path, capsys):
    _, _, _, root = ran
    assert main(["prune", "--model_dir", str(root / "model"), "--output_dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "hfprune prune: error: give exactly one budget" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_sweep_draws_pareto(ran, capsys):
    _, _, _, root = ran
    assert main(["sweep", str(root / "tiny.yaml"), "--ratios", "0.5,0.8", "--output.dir", str(root / "sw"),
                 "--pruning.criterion=magnitude", "--evaluation.latency_rounds=1"]) == 0
    text = capsys.readouterr().out
    assert "| 0.50 |" in text and "| 0.80 |" in text
    data = json.loads((root / "sw-sweep" / "sweep.json").read_text())
    assert [p["ratio"] for p in data["points"]] == [0.5, 0.8]
    assert data["points"][0]["macs"] < data["points"][1]["macs"]
    assert (root / "sw-sweep" / "pareto.png").stat().st_size > 1000


def test_sweep_honours_bias_compensation(ran, monkeypatch):
    import hfprune.pruning.recovery

    _, _, _, root = ran
    calls = []
    real = hfprune.pruning.recovery.compensate_biases
    monkeypatch.setattr(hfprune.pruning.recovery, "compensate_biases", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["sweep", str(root / "tiny.yaml"), "--ratios", "0.5", "--output.dir", str(root / "swb"),
                 "--pruning.criterion=fluctuation", "--pruning.bias_compensation=true",
                 "--evaluation.latency_rounds=1"]) == 0
    assert calls == [1]  # the one budget went through hfprune.prune with compensation
    assert json.loads((root / "swb-sweep" / "sweep.json").read_text())["recovery"] == "none+bias"


def test_bad_override_is_one_clear_line(ran, capsys):
    _, _, _, root = ran
    assert main(["run", str(root / "tiny.yaml"), "--pruning.macs_ration=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key pruning.macs_ration (did you mean 'macs_ratio'?)" in err


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "hfprune run [RECIPE]" in capsys.readouterr().out


def test_env_lists_versions(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"- hfprune: {hfprune.__version__}" in text and f"- transformers: {T.__version__}" in text


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "hfprune", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "hfprune push DIR REPO_ID" in proc.stdout


def test_gradual_with_distillation(ran, capsys):
    _, _, _, root = ran
    training = {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "use_cpu": True,
                "logging_steps": 2}
    path = root / "gradual.yaml"
    raw = yaml.safe_load((root / "tiny.yaml").read_text())
    raw.update(name="tiny-gradual", method="gradual", training=training, distillation={"alpha": 0.5},
               schedule={"kind": "gradual", "start_step": 0, "end_step": 4, "every": 2})
    raw["output"]["dir"] = str(root / "gradual")
    path.write_text(yaml.safe_dump(raw))
    users = root / ".gradual.trainer"  # the scratch folder's old fixed name: a folder hfprune did not write
    users.mkdir(exist_ok=True)
    (users / "keep.txt").write_text("mine")
    assert main(["run", str(path), "--evaluation.latency=false"]) == 0
    results = json.loads((root / "gradual" / "hfprune_results.json").read_text())
    assert results["distilled"] and results["macs"]["after"] <= 0.5 * results["macs"]["before"]
    assert "latency" not in results
    assert "- distilled" in (root / "gradual" / "README.md").read_text().split("---")[1]  # card tag
    assert not list(root.glob(".gradual.trainer-*"))  # the run's trainer scratch removed
    assert (users / "keep.txt").read_text() == "mine"  # and nothing it did not write


# -- the other tasks: a tiny Llama on token blocks (perplexity) and a tiny PatchTST on windows (mse/mae/mase) --

def lm_blocks(seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def rows(n):
        return datasets.Dataset.from_dict({"input_ids": torch.randint(3, 60, (n, 12), generator=g).tolist()})

    return datasets.DatasetDict(train=rows(16), test=rows(8))


def llama_dir(root):
    from tokenizers import Tokenizer, models

    config = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=37, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    T.LlamaForCausalLM(config).save_pretrained(root)
    vocab = {f"t{i}": i for i in range(64)}
    T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0",
                              eos_token="t2").save_pretrained(root)
    return root


def series_windows(seed=0):
    import numpy as np

    from hfprune.data.timeseries import TimeSeries, forecast_windows

    t = np.arange(np.datetime64("2024-01-01T00:00"), np.datetime64("2024-01-11T00:00"), np.timedelta64(30, "m"))
    values = np.random.default_rng(seed).random((len(t), 2)).astype("float32")
    strides = dict.fromkeys(("train", "validation", "test"), 16)
    return forecast_windows(TimeSeries(values, t, ("a", "b"), "30min"), 32, 8, strides=strides).dataset


def patchtst_dir(root):
    config = T.PatchTSTConfig(num_input_channels=2, context_length=32, prediction_length=8, patch_length=8,
                              patch_stride=8, d_model=16, num_attention_heads=4, num_hidden_layers=2, ffn_dim=24)
    T.PatchTSTForPrediction(config).save_pretrained(root)
    return root


def test_forecast_mase_scores_each_window_and_channel_as_one_series(tmp_path):
    """MASE by hand: per window and channel, the forecast's mean absolute error over the seasonal-naive error of
    that channel's own context; then the mean over all of them."""
    import numpy as np

    from hfprune.data.timeseries import ForecastCollator
    from hfprune.pipeline.recipe import load_recipe
    from hfprune.pipeline.run import evaluate_model

    model = T.PatchTSTForPrediction.from_pretrained(patchtst_dir(tmp_path / "model")).eval()
    rows = series_windows()["test"]
    batch = ForecastCollator(model.config)([rows[i] for i in range(len(rows))])
    spec = {"name": "t", "model": {"path": str(tmp_path / "model"), "task": "forecasting"},
            "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}}
    recipe = load_recipe({**spec, "evaluation": {"metrics": ["mase"], "periodicity": 4}})
    got = evaluate_model(recipe, model, [dict(batch)])["mase"]
    with torch.no_grad():
        pred = model(past_values=batch["past_values"]).prediction_outputs.numpy()  # (B, H, C)
    past, future = batch["past_values"].numpy(), batch["future_values"].numpy()
    ratios = [np.abs(pred[b, :, c] - future[b, :, c]).mean() / np.abs(past[b, 4:, c] - past[b, :-4, c]).mean()
              for b in range(len(pred)) for c in range(pred.shape[2])]
    assert got == pytest.approx(float(np.mean(ratios)), rel=1e-5)
    too_long = load_recipe({**spec, "evaluation": {"metrics": ["mase"], "periodicity": 32}})
    with pytest.raises(ValueError, match="periodicity=32 must be below the model's context_length=32"):
        evaluate_model(too_long, model, [dict(batch)])


@pytest.mark.parametrize("task, build, loader, metric_names", [
    ("causal-lm", llama_dir, "tests.test_cli:lm_blocks", ["perplexity"]),
    ("forecasting", patchtst_dir, "tests.test_cli:series_windows", ["mse", "mae", "mase"]),
])
def test_other_tasks_run(tmp_path, task, build, loader, metric_names):
    from hfprune.pipeline.recipe import load_recipe
    from hfprune.pipeline.run import run

    recipe = load_recipe({
        "name": task, "model": {"path": str(build(tmp_path / "model")), "task": task},
        "data": {"loader": loader, "calibration_samples": 8, "calibration_batch_size": 4},
        "pruning": {"criterion": "fisher", "macs_ratio": 0.5},
        "evaluation": {"metrics": metric_names, "latency_batch_size": 2, "latency_seq_len": 8, "latency_rounds": 1,
                       "periodicity": 8},  # below the 32-step context: MASE needs a seasonal-naive error
        "output": {"dir": str(tmp_path / "out")}})
    result = run(recipe).results
    assert set(metric_names) <= set(result["metrics"]["after"])
    assert result["macs"]["after"] <= 0.5 * result["macs"]["before"]
    assert result["latency"]["seq_len"] == (8 if task == "causal-lm" else 32)
    assert (tmp_path / "out" / "plots" / "kept_structure.png").is_file()

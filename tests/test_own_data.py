"""Your own data for every task (issue 20): CSV / text files and a datasets folder, written here into a temporary
folder, cut into splits without leaks, shaped by each task (word labels -> ids in the model's config, text packed
into blocks, rows cut into a forecaster's windows), run end to end through ``hfprune prune`` on tiny models, and
every bad input refused with the value and the columns found before anything is written."""

import json
import random

import datasets
import numpy as np
import pytest
import torch
import transformers as T

from hfprune.data.forecast_rows import model_windows, rows_to_series
from hfprune.data.labels import encode_labels
from hfprune.data.rows import cut, file_format, load_rows
from hfprune.pipeline.cli import main
from hfprune.pipeline.recipe import load_recipe
from hfprune.pipeline.tasks import get_task

from .test_cli import WORDS, make_tiny_model, patchtst_dir

LABELS = ("negative", "neutral", "positive")
CHEAP = ["--criterion", "magnitude", "--macs_ratio", "0.5", "--latency", "false"]


def spec(**data):
    return load_recipe({"name": "t", "pruning": {"criterion": "magnitude", "macs_ratio": 0.5}, "data": data}).data


# ---- files written by the tests ------------------------------------------------------------------------------------


def write_reviews(path, n: int, seed: int = 0, labels=LABELS, column: str = "label"):
    """A CSV of word labels; the words 'bad' / 'good' (or neither) tell the label."""
    rng = random.Random(seed)
    rows = [f"text,{column}"]
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS, 4) + {"negative": ["bad"], "positive": ["good"]}.get(label, [])
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def three_label_bert(root):
    """The tests' tiny BERT and word tokenizer, with a fresh three-output head (labels LABEL_0..2: no names)."""
    model_dir = make_tiny_model(root)
    config = T.AutoConfig.from_pretrained(model_dir)
    config.num_labels = 3
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).save_pretrained(model_dir)
    return model_dir


def tiny_lm(root):
    """A tiny Llama and a whitespace word tokenizer: words t3..t63 are ids 3..63; 0 pads, 1 is unknown, 2 ends a
    document (special tokens named unlike any word: a tokenizer finds them inside words first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                          eos_token="</s>")
    tokenizer.save_pretrained(root)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=37, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(root)
    return root


def write_series(path, steps: int = 400, shuffle: bool = True, drop: int | None = None):
    """A half-hourly CSV whose ``demand`` is the step index (every value says where it came from), rows shuffled:
    the loader must sort by time. ``drop``: leave that step out (a gap)."""
    t = np.datetime64("2024-01-01T00:00") + np.arange(steps) * np.timedelta64(30, "m")
    rows = [f"{t[i]},{float(i)},{1000.0 + (i % 48)},{float(i % 7)}" for i in range(steps) if i != drop]
    if shuffle:
        random.Random(0).shuffle(rows)
    path.write_text("time,demand,temperature,holiday\n" + "\n".join(rows) + "\n")
    return path


def steps_of(windows, split: str, key: str) -> np.ndarray:
    """The original step indices of the demand channel in ``key`` of every row of ``split``."""
    values = np.asarray(windows.dataset[split][key])
    return np.rint(windows.scaler.inverse_transform(values)[..., 0]).astype(int)


# ---- loading and cutting -----------------------------------------------------------------------------------------


def test_cut_gives_every_split_rows_and_train_the_rest():
    assert cut(100) == {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
    assert cut(3) == {"train": (0, 1), "validation": (1, 2), "test": (2, 3)}
    assert cut(10, {"train": 0.7, "test": 0.3}) == {"train": (0, 7), "test": (7, 10)}
    with pytest.raises(ValueError, match="2 row"):
        cut(2)
    with pytest.raises(ValueError, match="fractions="):
        cut(10, {"train": 0.5, "test": 0.2})


def test_format_comes_from_the_extension(tmp_path):
    assert file_format(["a.csv", "b.CSV"]) == "csv" and file_format(["a.jsonl"]) == "json"
    assert file_format(["x.parquet"]) == "parquet" and file_format(["x.txt"]) == "text"
    with pytest.raises(ValueError, match="mix formats"):
        file_format(["a.csv", "b.json"])
    with pytest.raises(ValueError, match="cannot tell the format from '.xlsx'"):
        file_format(["a.xlsx"])


def test_one_file_is_shuffled_into_three_splits(tmp_path):
    data = load_rows(seed=1, files=str(write_reviews(tmp_path / "r.csv", 30)))
    assert {k: v.num_rows for k, v in data.items()} == {"train": 24, "validation": 3, "test": 3}
    texts = [t for split in data.values() for t in split["text"]]
    assert len(set(texts)) == 30  # every row once
    assert data["train"]["text"] != load_rows(seed=2, files=str(tmp_path / "r.csv"))["train"]["text"]


def test_split_files_and_a_datasets_folder_keep_their_splits(tmp_path):
    train, test = write_reviews(tmp_path / "train.csv", 12), write_reviews(tmp_path / "test.csv", 6, seed=1)
    data = load_rows(files={"train": str(train), "test": str(test)})
    assert {k: v.num_rows for k, v in data.items()} == {"train": 12, "test": 6}
    folder = tmp_path / "folder"
    folder.mkdir()
    write_reviews(folder / "train.csv", 20)
    whole = load_rows(dataset=str(folder), split="train")
    assert {k: v.num_rows for k, v in whole.items()} == {"train": 16, "validation": 2, "test": 2}


def test_text_files_split_by_document_or_by_paragraph_in_order(tmp_path):
    docs = []
    for i in range(5):  # one document per file: its own words, so each token tells its document
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(" ".join(f"t{3 + 10 * i + j}" for j in range(10)) + "\n")
    data = load_rows(files=[str(p) for p in docs])
    assert sum(v.num_rows for v in data.values()) == 5  # a row per file
    one = tmp_path / "book.txt"
    one.write_text("\n\n".join(f"paragraph {i}" for i in range(10)) + "\n")
    data = load_rows(files=str(one))
    assert [t.strip() for t in data["test"]["text"]] == ["paragraph 9"]  # in order: the end of the book is test


def test_loading_refuses_missing_empty_and_headless_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv' does not exist"):
        load_rows(files=str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv' is empty"):
        load_rows(files=str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match=r"header.csv': no rows \(columns found: \['text', 'label'\]\)"):
        load_rows(files=str(tmp_path / "header.csv"))
    with pytest.raises(ValueError, match=r"time_column 'when' is not a column .* \['text', 'label'\]"):
        load_rows(files=str(write_reviews(tmp_path / "r.csv", 9)), time_column="when")
    with pytest.raises(ValueError, match="exactly one of files= .* or dataset="):
        load_rows()


# ---- text classification: word labels -----------------------------------------------------------------------------


def test_word_labels_become_sorted_ids_named_in_the_config(tmp_path):
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": ["pos", "neg", "neu", "pos"]}),
                               test=datasets.Dataset.from_dict({"label": ["neu", "neg"]}))
    config = T.BertConfig(num_labels=3)
    data, names = encode_labels(raw, "label", config=config)
    assert names == ["neg", "neu", "pos"] and list(data["train"]["label"]) == [2, 0, 1, 2]
    assert list(data["test"]["label"]) == [1, 0]  # the train split's mapping, for every split
    assert config.id2label == {0: "neg", 1: "neu", 2: "pos"} and config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    named = T.BertConfig(id2label={0: "pos", 1: "neg"})  # a fine-tuned head keeps the meaning of its outputs
    data, _ = encode_labels(datasets.DatasetDict(train=raw["train"].filter(lambda r: r["label"] != "neu")), "label",
                            config=named)
    assert list(data["train"]["label"]) == [0, 1, 0]
    numbers = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": [0, 1]}))
    assert encode_labels(numbers, "label")[1] is None  # ids stay as they are


def test_word_label_errors_name_the_label(tmp_path):
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": ["pos", "neg"]}),
                               test=datasets.Dataset.from_dict({"label": ["neg", "meh"]}))
    with pytest.raises(ValueError, match=r"split 'test' has label\(s\) \['meh'\] that the 'train' split lacks"):
        encode_labels(raw, "label")
    ok = datasets.DatasetDict(train=raw["train"])
    with pytest.raises(ValueError, match=r"2 labels \['neg', 'pos'\], but the model's head has 3 output"):
        encode_labels(ok, "label", config=T.BertConfig(num_labels=3))
    with pytest.raises(ValueError, match=r"label\(s\) \['neg'\] are not among the model's labels \['pos', 'bad'\]"):
        encode_labels(ok, "label", config=T.BertConfig(id2label={0: "pos", 1: "bad"}))


def test_classification_refuses_a_missing_column_naming_those_found(tmp_path):
    model_dir = three_label_bert(tmp_path)
    task = get_task("text-classification")
    raw = load_rows(files=str(write_reviews(tmp_path / "r.csv", 12, column="sentiment")))
    with pytest.raises(ValueError, match=r"data.label_column='label' is not a column of split 'train'; its columns "
                                         r"are \['text', 'sentiment'\]"):
        task.prepare_data(raw, task.load_tokenizer(model_dir), spec())
    with pytest.raises(ValueError, match=r"data.text_column='body' is not a column .* \['text', 'sentiment'\]"):
        task.prepare_data(raw, task.load_tokenizer(model_dir), spec(text_column="body", label_column="sentiment"))


def test_prune_a_classifier_with_word_labels_from_csv(tmp_path, capsys):
    model_dir = three_label_bert(tmp_path)
    train, test = write_reviews(tmp_path / "train.csv", 30), write_reviews(tmp_path / "test.csv", 12, seed=1)
    out = tmp_path / "out"
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(out), *CHEAP,
                 "--data_files", f"train={train}", f"test={test}", "--max_length", "16"]) == 0, capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    results = json.loads((out / "hfprune_results.json").read_text())
    assert results["eval"]["examples"] == 12 and "accuracy" in results["metrics"]["after"]
    recipe = (out / "recipe.yaml").read_text()
    assert "hfprune.data.rows:load_rows" in recipe and "test.csv" in recipe


def test_prune_refuses_bad_data_flags_before_writing(tmp_path, capsys):
    model_dir = three_label_bert(tmp_path)
    reviews = write_reviews(tmp_path / "r.csv", 12)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    out = tmp_path / "out"
    cases = [
        (["--data_files", str(reviews), "--label_column", "stars"],
         "data.label_column='stars' is not a column of split 'train'; its columns are ['text', 'label']"),
        (["--data_files", str(tmp_path / "empty.csv")], "empty.csv' is empty"),
        (["--data_files", str(tmp_path / "header.csv")], "header.csv': no rows (columns found: ['text', 'label'])"),
        (["--data_files", str(reviews), "--time_column", "t"], "--time_column: for --task forecasting only"),
        (["--data_files", str(reviews), "--data", "movie_reviews"], "--data movie_reviews and --data_files both"),
        (["--data_files", str(reviews), "--dataset", "imdb"], "give --data_files (local files) or --dataset"),
        (["--split", "train"], "--dataset_config and --split go with --dataset"),
        (["--data_files", str(reviews), f"test={reviews}"], "give either paths (one pool, cut into splits) or"),
        (["--task", "forecasting", "--data_files", str(reviews), "--time_column", "t"],
         "--task forecasting from --data_files needs --target_columns"),
    ]
    for flags, message in cases:
        assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(out), *CHEAP, *flags]) == 2, flags
        last = capsys.readouterr().err.splitlines()[-1]  # before it: the loading's progress bars, if any
        assert last.startswith("hfprune prune: error: ") and message in last, (flags, last)
        assert not out.exists(), flags


# ---- causal LM: text packed into blocks, each split on its own -----------------------------------------------------


def test_text_is_packed_per_split_and_blocks_never_mix_splits(tmp_path):
    model_dir = tiny_lm(tmp_path / "lm")
    files = []
    for i in range(6):  # document i uses words t(3 + 10 i) .. t(12 + 10 i): a token tells its document
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(" ".join(f"t{3 + 10 * i + j % 10}" for j in range(23)) + "\n")
    raw = load_rows(files=[str(p) for p in files])
    task = get_task("causal-lm")
    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    data = task.prepare_data(raw, task.load_tokenizer(model_dir), spec(max_length=8), model)
    for split, rows in data.items():
        docs = {(int(t.split("t")[1]) - 3) // 10 for text in raw[split]["text"] for t in text.split()}
        for block in rows["input_ids"]:
            assert len(block) == 8
            assert {(t - 3) // 10 for t in block if t != 2} <= docs, split  # EOS (t2) joins documents
    with pytest.raises(ValueError, match=r"split 'validation': the text holds 24 tokens, fewer than block_size=32"):
        task.prepare_data(raw, task.load_tokenizer(model_dir), spec(max_length=32), model)
    with pytest.raises(ValueError, match="data.max_length=100: blocks longer than the model's 64 positions"):
        task.prepare_data(raw, task.load_tokenizer(model_dir), spec(max_length=100), model)


def test_prune_a_language_model_from_csv(tmp_path, capsys):
    model_dir = tiny_lm(tmp_path / "lm")
    rng = random.Random(0)
    rows = ["body,source"] + [f"{' '.join(f't{rng.randint(3, 63)}' for _ in range(30))},web" for _ in range(30)]
    (tmp_path / "lm.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(out), "--task", "causal-lm", *CHEAP,
                 "--data_files", str(tmp_path / "lm.csv"), "--text_column", "body", "--max_length", "16"]) == 0, \
        capsys.readouterr()
    results = json.loads((out / "hfprune_results.json").read_text())
    assert results["metrics"]["after"]["perplexity"] > 1 and results["eval"]["examples"] >= 5
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "bad"), "--task",
                 "causal-lm", *CHEAP, "--data_files", str(tmp_path / "lm.csv")]) == 2
    err = capsys.readouterr().err
    assert "data.text_column='text' is not a column of split 'train'; its columns are ['body', 'source']" in err
    assert not (tmp_path / "bad").exists()


# ---- forecasting: rows cut into the model's windows ----------------------------------------------------------------


def test_rows_become_the_models_windows_without_leaks(tmp_path):
    raw = load_rows(files=str(write_series(tmp_path / "s.csv")), time_column="time")
    config = T.PatchTSTConfig(num_input_channels=2, context_length=32, prediction_length=8)
    windows = model_windows(raw, config, "time", ["demand", "temperature"])
    assert windows.bounds == {"train": (0, 320), "validation": (320, 360), "test": (360, 400)}
    train_past, train_future = steps_of(windows, "train", "past_values"), steps_of(windows, "train", "future_values")
    assert train_past.shape[1:] == (32,) and train_future.shape[1:] == (8,)
    assert train_future.max() == 319 and train_past.max() < 319  # no train window reads a later span
    test_future = steps_of(windows, "test", "future_values")
    assert test_future.min() == 360 and test_future.max() == 399  # every test step forecast once (stride 8)
    assert len(test_future) == 5 and (np.diff(test_future[:, 0]) == 8).all()
    assert steps_of(windows, "test", "past_values")[0, 0] == 360 - 32  # the past reaches back, as it may
    train_values = np.arange(320, dtype=np.float32)
    assert windows.scaler.mean[0] == pytest.approx(train_values.mean())  # train statistics only


def test_covariates_feed_the_time_features_of_seq2seq_models(tmp_path):
    raw = load_rows(files=str(write_series(tmp_path / "s.csv", steps=300)), time_column="time")
    config = T.TimeSeriesTransformerConfig(input_size=1, context_length=12, prediction_length=4, lags_sequence=[1, 2],
                                           num_time_features=4, num_dynamic_real_features=1, d_model=8,
                                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                           decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8)
    windows = model_windows(raw, config, "time", ["demand"], ["holiday"])
    row = windows.dataset["train"][0]
    assert tuple(row["past_values"].shape) == (14, 1) and tuple(row["past_time_features"].shape) == (14, 5)
    from hfprune.data.timeseries import ForecastCollator

    batch = ForecastCollator(config)([windows.dataset["test"][i] for i in range(2)])
    torch.manual_seed(0)
    loss = T.TimeSeriesTransformerForPrediction(config)(**batch).loss  # the model takes them as they are
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"the time_series_transformer model reads 5 time features .* 4 from the "
                                         r"time column \+ 0 covariate"):
        model_windows(raw, config, "time", ["demand"])
    with pytest.raises(ValueError, match=r"covariate_columns=\['holiday'\]: a patchtst model reads no covariates"):
        model_windows(raw, T.PatchTSTConfig(num_input_channels=1, context_length=12, prediction_length=4), "time",
                      ["demand"], ["holiday"])


def test_forecasting_rows_are_refused_naming_the_column(tmp_path):
    config = T.PatchTSTConfig(num_input_channels=2, context_length=32, prediction_length=8)
    raw = load_rows(files=str(write_series(tmp_path / "s.csv")), time_column="time")
    with pytest.raises(ValueError, match=r"column\(s\) \['load'\] not in split 'train'; its columns are \['time', "
                                         r"'demand', 'temperature', 'holiday'\]"):
        model_windows(raw, config, "time", ["demand", "load"])
    with pytest.raises(ValueError, match=r"\['demand', 'temperature', 'holiday'\]: 3 column\(s\), but the patchtst "
                                         r"model reads 2 channel\(s\)"):
        model_windows(raw, config, "time", ["demand", "temperature", "holiday"])
    gap = load_rows(files=str(write_series(tmp_path / "gap.csv", drop=100)), time_column="time")
    with pytest.raises(ValueError, match=r"not regular: 2024-01-03T01:30:00 -> 2024-01-03T02:30:00"):
        model_windows(gap, config, "time", ["demand", "temperature"])
    t = [f"2024-01-01 {h:02d}:00" for h in range(24)]
    early, late = {"time": t[:12], "v": [1.0] * 12}, {"time": t[8:], "v": [1.0] * 16}
    with pytest.raises(ValueError, match="split 'test' starts at 2024-01-01T08:00:00, before split 'train' ends"):
        rows_to_series({"train": early, "test": late}, "time", ["v"])
    with pytest.raises(ValueError, match="split 'test' starts at 2024-01-01T00:00:00, before the 'train' split"):
        rows_to_series({"train": {"time": t[12:], "v": [1.0] * 12}, "test": early}, "time", ["v"])
    with pytest.raises(ValueError, match="column 'v' of split 'train' holds 'n/a', not a number"):
        rows_to_series({"train": {"time": t, "v": ["n/a"] * 24}}, "time", ["v"])
    with pytest.raises(ValueError, match="column 'time' of split 'train' is not a date/time column"):
        rows_to_series({"train": {"time": ["soon"] * 24, "v": [1.0] * 24}}, "time", ["v"])
    with pytest.raises(ValueError, match="the time 2024-01-01T00:00:00 appears twice"):
        rows_to_series({"train": {"time": [t[0]] * 2, "v": [1.0] * 2}}, "time", ["v"])
    task = get_task("forecasting")
    with pytest.raises(ValueError, match=r"the rows have columns \['time', 'demand', 'temperature', 'holiday'\], not "
                                         r"forecasting windows .* set data.time_column and data.target_columns"):
        task.prepare_data(raw, None, spec())


def test_a_recipe_reads_forecasting_rows_from_split_files(tmp_path):
    from hfprune.pipeline.run import load_data

    lines = write_series(tmp_path / "all.csv", steps=300, shuffle=False).read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(lines[:241]) + "\n")  # the header and the first 240 steps
    (tmp_path / "test.csv").write_text("\n".join(lines[:1] + lines[241:]) + "\n")
    files = {split: str(tmp_path / f"{split}.csv") for split in ("train", "test")}
    recipe = load_recipe({"name": "f", "model": {"path": str(tmp_path), "task": "forecasting"},
                          "pruning": {"criterion": "magnitude", "macs_ratio": 0.5},
                          "data": {"loader": "files", "format": "csv", "files": files, "time_column": "time",
                                   "target_columns": ["demand", "temperature"]}})
    model = T.PatchTSTForPrediction(T.PatchTSTConfig(num_input_channels=2, context_length=32, prediction_length=8))
    data = load_data(recipe, None, model=model)
    assert sorted(data) == ["test", "train"] and data["test"].num_rows == 60 // 8
    assert tuple(data["train"][0]["past_values"].shape) == (32, 2)
    with pytest.raises(ValueError, match="needs the model"):
        load_data(recipe, None)


def test_prune_a_forecaster_from_one_csv(tmp_path, capsys):
    model_dir = patchtst_dir(tmp_path / "model")
    series = write_series(tmp_path / "demand.csv")
    out = tmp_path / "out"
    flags = ["--data_files", str(series), "--time_column", "time", "--target_columns", "demand,temperature"]
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(out), "--task", "forecasting", *CHEAP,
                 *flags]) == 0, capsys.readouterr()
    results = json.loads((out / "hfprune_results.json").read_text())
    assert set(results["metrics"]["after"]) == {"mse", "mae"} and results["eval"]["examples"] == 5
    assert "target_columns:\n  - demand\n  - temperature" in (out / "recipe.yaml").read_text()
    assert main(["prune", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "bad"), "--task",
                 "forecasting", *CHEAP, "--data_files", str(series), "--time_column", "time", "--target_columns",
                 "demand", "load"]) == 2
    err = capsys.readouterr().err
    assert "column(s) ['load'] not in split 'train'; its columns are ['time', 'demand', 'temperature', 'holiday']" \
        in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("module", ["hfprune.data.rows", "hfprune.data.labels", "hfprune.data.forecast_rows"])
def test_the_docstring_example_holds(module):
    import doctest
    import importlib

    mod = importlib.import_module(module)
    # the fences of the docstring's markdown code block are not part of the expected output
    text = "\n".join(line for line in mod.__doc__.splitlines() if not line.strip().startswith("```"))
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(text, {}, module, mod.__file__, 0))
    assert runner.failures == 0 and runner.tries > 0

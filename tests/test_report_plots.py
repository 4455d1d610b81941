# Copyright hfprune contributors. Apache-2.0.
"""The report's plots (kept structure, importance, Pareto) from small synthetic checkpoints, the pure helpers
behind the importance heatmap, and the label names on the model card. No model is built or run."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hfprune.pipeline import card, report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_sane_png(path):
    width, height = _png_size(path)
    assert 300 <= width <= 4000 and 200 <= height <= 3000, (width, height)
    assert 5_000 < path.stat().st_size < 2_000_000
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (height, width)  # decodes


def _layers():
    kept = [(4, 40), (3, 20), (0, 0)]
    return [{"stack": "layers", "index": i, "dropped": h == 0, "dense_heads": {"heads": 4}, "heads": {"heads": h},
             "dense_neurons": {"ffn": 64}, "neurons": {"ffn": n}} for i, (h, n) in enumerate(kept)]


def _checkpoint(tmp_path, id2label=None):
    """A folder with what the report and card read: results, plan, scores, config."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    scores = {}
    for i in range(3):
        scores[f"layers.{i}.heads"] = rng.uniform(0.05, 2.0, 4).astype(np.float32)
        scores[f"layers.{i}.ffn"] = (10.0 ** rng.uniform(-6 - i, 1 - i, 64)).astype(np.float32)  # heavy-tailed
    save_file(scores, str(tmp_path / "importance.safetensors"))
    plan = {"model_type": "bert", "layers": [{"heads": None, "ffn": list(range(40))},
                                             {"heads": [0, 2, 3], "ffn": list(range(0, 40, 2))}, {"drop": True}]}
    (tmp_path / "prune_plan.json").write_text(json.dumps(plan))
    results = {"recipe": "tiny", "task": "classification", "method": "oneshot",
               "metrics": {"before": {"accuracy": 0.9}, "after": {"accuracy": 0.85}},
               "params": {"before": 1000, "after": 600}, "macs": {"before": 500, "after": 250, "seq_len": 8},
               "layers": _layers()}
    (tmp_path / "hfprune_results.json").write_text(json.dumps(results))
    config = {"model_type": "bert"}
    if id2label is not None:
        config["id2label"] = id2label
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_report_draws_valid_pngs(tmp_path):
    (tmp_path / "ckpt").mkdir()
    directory = _checkpoint(tmp_path / "ckpt")
    text, paths = report.report(directory, out=tmp_path / "plots")
    assert [p.name for p in paths] == ["kept_structure.png", "importance.png"]
    assert "| layer 0 |" in text
    for path in paths:
        _assert_sane_png(path)


def test_pareto_plot_is_a_valid_png(tmp_path):
    sweep = {"key": "macs_ratio", "criterion": "fisher",
             "dense": {"metrics": {"accuracy": 0.9}, "macs": 100},
             "points": [{"ratio": r, "metrics": {"accuracy": a}, "macs": 100 * r, "latency_ms": 10 * r + 1,
                         "dense_latency_ms": 11.0} for r, a in ((0.4, 0.7), (0.6, 0.82), (0.8, 0.88))]}
    _assert_sane_png(report.plot_pareto(sweep, tmp_path / "pareto.png"))
    loss = {**sweep, "dense": {"metrics": {"loss": 1.0}, "macs": 100},
            "points": [{**p, "metrics": {"loss": 2.0 - p["ratio"]}} for p in sweep["points"]]}
    _assert_sane_png(report.plot_pareto(loss, tmp_path / "pareto_loss.png"))


def test_no_scores_no_importance_plot(tmp_path):
    assert report.plot_importance({}, {}, tmp_path / "importance.png") is None
    assert not (tmp_path / "importance.png").exists()


def test_row_normalise_spans_zero_to_one_per_row():
    rng = np.random.default_rng(1)
    for scale in (1e-6, 1.0, 1e4):
        v = scale * 10.0 ** rng.uniform(-5, 0, 200)
        out = report.row_normalise(v)
        assert out.min() == 0.0 and out.max() == 1.0
        assert out[np.argmax(v)] == 1.0
        assert np.all(np.diff(out[np.argsort(v)]) >= 0)  # monotone in the score
    # the scale of a layer does not matter, only its shape: rows are comparable however small their scores
    v = 10.0 ** rng.uniform(-3, 0, 50)
    np.testing.assert_allclose(report.row_normalise(v), report.row_normalise(v * 1e-5), atol=1e-12)
    np.testing.assert_array_equal(report.row_normalise([0.0, -1.0, 0.0]), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(report.row_normalise([2.0, 2.0, 0.0]), [1.0, 1.0, 0.0])


def test_sorted_grid_sorts_each_row_and_marks_removed_units():
    values = [np.array([0.1, 5.0, 0.001, 1.0]), np.array([1e-6, 1e-4, 1e-5])]
    kept = [[1, 3], []]
    grid, removed, n_kept = report.sorted_grid(values, kept)
    assert grid.shape == (2, 4) and n_kept == [2, 0]
    for r, v in enumerate(values):
        row = grid[r, : len(v)]
        assert row[0] == 1.0 and row[-1] == 0.0  # each row spans [0, 1], most important first
        assert np.all(np.diff(row) <= 0)
    assert np.isnan(grid[1, 3])  # the narrower layer is padded
    # row 0 sorted: 5.0 (kept), 1.0 (kept), 0.1, 0.001
    assert removed[0].tolist() == [False, False, True, True]
    assert removed[1, :3].all() and not removed[1, 3]


def test_kept_units_reads_the_plan():
    plan = {"layers": [{"heads": None, "ffn": [0, 2]}, {"drop": True}, {}]}
    assert report.kept_units(plan, ("layers", 0), "heads", 3) == [0, 1, 2]
    assert report.kept_units(plan, ("layers", 0), "ffn", 4) == [0, 2]
    assert report.kept_units(plan, ("layers", 1), "ffn", 4) == []
    assert report.kept_units(plan, ("layers", 2), "ffn", 2) == [0, 1]
    assert report.kept_units({}, ("layers", 5), "ffn", 2) == [0, 1]


def test_log_span_fits_the_data():
    assert report.log_span([1.0, 0.5], 1.0) == 1
    assert report.log_span([1.0, 0.002], 1.0) == 3
    assert report.log_span([1.0, 1e-12], 1.0) == 6
    assert report.log_span([0.0], 1.0) == 1


def test_card_lists_label_names(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    _checkpoint(directory, id2label={"0": "negative", "1": "positive"})
    text = card.build_card(directory).text
    assert "0 = `negative`, 1 = `positive`" in text
    results_section = text.split("## Results")[1].split("## How to load")[0]
    assert "`positive`" in results_section


def test_card_skips_default_label_names(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    _checkpoint(directory, id2label={"0": "LABEL_0", "1": "LABEL_1"})
    assert "Labels (" not in card.build_card(directory).text
    assert card.labels_line(None) is None and card.labels_line({}) is None
    assert card.labels_line({0: "LABEL_0", 1: "spam"}) == (
        "Labels (2, from `id2label` in config.json): 0 = `LABEL_0`, 1 = `spam`.")
    many = card.labels_line({str(i): f"class {i}" for i in range(100)})
    assert "39 = `class 39`" in many and "40 = " not in many and "60 more" in many

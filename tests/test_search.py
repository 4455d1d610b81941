"""Searched shapes (hfprune.pruning.search, ``hfprune search``): every candidate meets its budget, the chosen shape is
applied and reloads as a plain checkpoint with identical logits, a new budget reuses the cached scoring passes, the
CLI writes its table/JSON/PNG, bad input is refused before anything loads, and the experts axis of a MoE model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import hfprune
from hfprune.core.cost import estimate
from hfprune.perplexity import perplexity
from hfprune.pruning.search import SearchConfig, search
from hfprune.pruning.search import scores as search_scores
from hfprune.pruning.search.enumerate import build_plan, geometry
from hfprune.pruning.search.runner import split_examples

from .cases_moe import MOE_CASES


def _llama(seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=99, hidden_size=36, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=6, num_key_value_heads=3, head_dim=8, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return T.LlamaForCausalLM(config).eval()


def _data(n: int = 12, seq: int = 16, seed: int = 1) -> list:
    ids = torch.randint(3, 99, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4])} for i in range(0, n, 4)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("budget,ratio", [("params", 0.8), ("macs", 0.6), ("memory", 0.7)])
def test_every_candidate_meets_the_budget(budget, ratio):
    model = _llama()
    config = SearchConfig(budget=budget, ratio=ratio, eval_examples=4, context=64,
                          grid={"depth": [1, 0.75], "hidden": [1, 0.84], "heads": [1, 0.67]})
    result = search(model, _data(), config, apply=False)
    assert model.config.num_hidden_layers == 4  # apply=False leaves the model whole
    dense = estimate(model, seq_len=config.seq_len)
    assert len(result.rows) >= 4
    for row in result.rows:
        assert row["fraction"] <= ratio + 1e-9, row["label"]
        plan = hfprune.PrunePlan.from_dict(row["plan"])
        est = estimate(model, plan, seq_len=config.seq_len)  # recomputed independently of the search's meter
        if budget == "params":
            assert est.params <= ratio * dense.params
        if budget == "macs":
            assert est.macs <= ratio * dense.macs
    assert [r["score"] for r in result.rows] == sorted(r["score"] for r in result.rows)
    assert result.rows[result.chosen]["chosen"]
    shapes = {tuple(sorted(r["shape"].items())) for r in result.rows}
    assert len(shapes) == len(result.rows)  # no candidate twice


@pytest.mark.parametrize("recovery", ["none", "obs"])
def test_chosen_plan_is_applied_and_reloads_plain(tmp_path, recovery):
    model = _llama()
    data = _data()
    calibration, held_out = split_examples(data, 4)
    config = SearchConfig(ratio=0.75, eval_examples=4, recovery=recovery, finalists=2,
                          grid={"depth": [1, 0.75], "hidden": [1, 0.84], "heads": [1, 0.67]})
    result = search(model, data, config)
    best = result.best
    assert sum(p.numel() for p in model.parameters()) == best["params"]
    score = perplexity(model, held_out)["perplexity"]  # what the search measured for the chosen one
    assert score == pytest.approx(best.get("recovered_score", best["score"]), rel=1e-5)
    if recovery == "obs":
        assert "recovered_score" in result.rows[0] and "recovered_score" in result.rows[1]
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in saved and not list((tmp_path / "out").glob("*.py"))  # a plain checkpoint
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is T.LlamaForCausalLM
    ids = data[0]["input_ids"]
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.config.num_hidden_layers == best["shape"]["layers"]
    assert reloaded.config.intermediate_size == best["shape"]["ffn"]


def test_every_kind_of_shape_gets_a_recovered_finalist():
    from hfprune.pruning.search.runner import finalist_rows, shape_kind

    dense = {"layers": 4, "hidden": 32, "groups": 2, "ffn": 64, "experts": None}
    assert shape_kind({**dense, "ffn": 40}, dense) == ("ffn",)
    assert shape_kind({**dense, "layers": 3, "ffn": 48}, dense) == ("layers", "ffn")
    model, data = _llama(), _data()
    grid = {"depth": [1, 0.75], "hidden": [1, 0.84], "heads": [1, 0.67]}
    per_kind = search(model, data, SearchConfig(ratio=0.75, eval_examples=4, recovery="obs", finalists=1, grid=grid),
                      apply=False)
    geo = per_kind.extra["geometry"]
    dense = {"layers": geo["layers"], "hidden": geo["hidden"], "groups": geo["kv_groups"], "ffn": geo["ffn"],
             "experts": None}
    assert dense == {"layers": 4, "hidden": 36, "groups": 3, "ffn": 64, "experts": None}
    kinds = {shape_kind(r["shape"], dense) for r in per_kind.rows}
    recovered = [r for r in per_kind.rows if "recovered_score" in r]
    assert len(kinds) >= 4 and {shape_kind(r["shape"], dense) for r in recovered} == kinds
    for kind in kinds:  # the recovered one of each kind is that kind's best unrecovered candidate
        first = next(r for r in per_kind.rows if shape_kind(r["shape"], dense) == kind)
        assert "recovered_score" in first
    chosen = per_kind.rows[per_kind.chosen]
    assert chosen["recovered_score"] == min(r["recovered_score"] for r in recovered)
    assert finalist_rows(per_kind.rows, dense, 1, False) == [0]
    only_best = search(_llama(), data, SearchConfig(ratio=0.75, eval_examples=4, recovery="obs", finalists=1,
                                                    grid=grid, finalist_per_kind=False), apply=False)
    assert [i for i, r in enumerate(only_best.rows) if "recovered_score" in r] == [0]


def test_new_budget_reuses_cached_scores(tmp_path, monkeypatch):
    calls = []
    real = search_scores.run_pass
    monkeypatch.setattr(search_scores, "run_pass", lambda name, *a: calls.append(name) or real(name, *a))
    model, data = _llama(), _data()
    grid = {"depth": [1, 0.75], "hidden": [1, 0.84]}
    first = search(model, data, SearchConfig(ratio=0.8, eval_examples=4, grid=grid, cache_dir=str(tmp_path)),
                   apply=False)
    assert sorted(calls) == ["blocks", "depth", "hidden"] and sorted(first.passes_run) == sorted(calls)
    second = search(model, data, SearchConfig(ratio=0.6, eval_examples=4, grid=grid, cache_dir=str(tmp_path)),
                    apply=False)
    assert len(calls) == 3 and second.passes_run == []  # no scoring pass for the new budget
    assert sorted(second.passes_cached) == ["blocks", "depth", "hidden"]
    again = search(model, data, SearchConfig(ratio=0.6, eval_examples=4, grid=grid, cache_dir=str(tmp_path)),
                   apply=False)
    assert again.evaluated == 0 and again.eval_cached == len(again.rows)  # same budget: every evaluation cached
    assert [r["score"] for r in again.rows] == [r["score"] for r in second.rows]
    # another model (a changed weight) misses the cache
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    other = search(model, data, SearchConfig(ratio=0.6, eval_examples=4, grid=grid, cache_dir=str(tmp_path)),
                   apply=False)
    assert sorted(other.passes_run) == ["blocks", "depth", "hidden"]
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["evals", "evals", "scores", "scores"]


def _saved_model_and_text(tmp_path):
    """A tiny Llama with a word-level tokenizer saved to ``tmp_path/dense``, and a calibration text file."""
    tok = pytest.importorskip("tokenizers")
    _llama().save_pretrained(tmp_path / "dense")
    vocab = {f"w{i}": i for i in range(99)}
    backend = tok.Tokenizer(tok.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tok.pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0",
                              eos_token="w2").save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 96 + 3}" for j in range(40)) for i in range(30)))
    return text


def test_cli_writes_table_json_plot_and_checkpoint(tmp_path, capsys):
    from hfprune.pipeline.cli import main

    text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    rc = main(["search", str(tmp_path / "dense"), "--output", str(out), "--params_ratio", "0.75",
               "--data_files", str(text), "--max_length", "16", "--calibration_rows", "8", "--eval_rows", "4",
               "--grid", "depth=1,0.75", "--grid", "hidden=1,0.84"])
    printed = capsys.readouterr().out
    assert rc == 0 and "**chosen**" in printed
    for name in ("search_candidates.md", "search_candidates.json", "search_candidates.png", "config.json",
                 "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    table = json.loads((out / "search_candidates.json").read_text())
    assert table["candidates"][table["chosen"]]["chosen"] and len(table["candidates"]) >= 2
    assert (out / "search_cache").is_dir()
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == table["candidates"][table["chosen"]]["params"]
    # a second budget on the same output: the scoring passes come from the cache
    rc = main(["search", str(tmp_path / "dense"), "--output", str(tmp_path / "out2"), "--params_ratio", "0.6",
               "--data_files", str(text), "--max_length", "16", "--calibration_rows", "8", "--eval_rows", "4",
               "--grid", "depth=1,0.75", "--grid", "hidden=1,0.84", "--cache_dir", str(out / "search_cache")])
    assert rc == 0 and "scoring passes run: none" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": "flops"}, r"budget='flops'; choose one of \('params', 'macs', 'memory', 'latency'\)"),
    ({"ratio": 1.5}, r"ratio=1.5 must be a number in \(0, 1\]"),
    ({"axes": ("depth", "width")}, r"'width' is not an axis; choose from"),
    ({"axes": ()}, r"axes=\(\): give a non-empty list"),
    ({"grid": {"depth": [0]}}, r"grid\['depth'\]: 0 is not a kept fraction"),
    ({"grid": {"layers": [1]}}, r"grid: 'layers' is not an axis"),
    ({"budget": "latency"}, r"budget='latency' with the 'hidden' axis"),
    ({"criterion": "nope"}, r"criterion='nope' is not supported"),
    ({"recovery": "lora"}, r"recovery='lora'; choose one of \('none', 'obs'\)"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_bad_input_refused_before_loading(tmp_path, capsys):
    from hfprune.pipeline.cli import main

    missing = str(tmp_path / "nowhere")
    for argv, match in [
        ([], "give exactly one budget"),
        (["--params_ratio", "0.8", "--macs_ratio", "0.5"], "give exactly one budget"),
        (["--params_ratio", "0.8", "--axes", "depth,width"], "'width' is not an axis"),
        (["--params_ratio", "0.8", "--grid", "depth"], "write AXIS=F1,F2"),
        (["--params_ratio", "0.8"], "does not exist"),
    ]:
        assert main(["search", missing, "--output", str(tmp_path / "o"), *argv]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written
    model = _llama()
    with pytest.raises(ValueError, match="eval_examples=12"):  # all the data held out: nothing left to score with
        search(model, _data(), SearchConfig(eval_examples=12))
    with pytest.raises(ValueError, match="no depth shape meets"):  # one layer left is still over the budget
        search(model, _data(), SearchConfig(ratio=0.05, axes=("depth",), eval_examples=4))
    assert model.config.num_hidden_layers == 4


def test_pruning_config_scope_search():
    with pytest.raises(ValueError, match="scope='search' takes a params_ratio"):
        hfprune.PruningConfig(scope="search", ffn_ratio=0.5)
    model = _llama()
    before = sum(p.numel() for p in model.parameters())
    config = hfprune.PruningConfig(criterion="activation", scope="search", params_ratio=0.7)
    result = hfprune.prune(model, _data(), config)
    assert result.after.params == sum(p.numel() for p in model.parameters()) <= 0.7 * before


def test_experts_axis_on_a_moe_model():
    case = MOE_CASES["qwen3_moe"]
    model = case.build().eval()
    data = [case.inputs(s, batch=4) for s in range(3)]
    config = SearchConfig(ratio=0.75, axes=("depth", "experts"), eval_examples=4, grid={"depth": [1, 0.67]})
    geo = geometry(model, config)
    assert geo.experts == 6 and geo.top_k == 2 and "experts" in geo.present and "ffn" not in geo.present
    result = search(model, data, config)
    assert all(r["fraction"] <= 0.75 for r in result.rows)
    assert {r["shape"]["layers"] for r in result.rows} == {3, 2}
    assert all(2 <= r["shape"]["experts"] < 6 or r["shape"]["layers"] < 3 for r in result.rows)
    best = result.best["shape"]
    assert model.config.num_hidden_layers == best["layers"] and model.config.num_experts == best["experts"]
    with torch.no_grad():
        assert torch.isfinite(model(**data[0]).logits).all()
    # the plan keeps the best-scored experts of each layer
    scores = search_scores.run_pass("experts", case.build().eval(), data[:2], config)
    plan = build_plan(geo, {"experts": scores}, type(geometry(model, config).dense_shape())(3, None, 2, None, 4))
    keep = plan.layers[0].get("experts")
    assert list(keep) == sorted(torch.topk(scores[("layers", 0, "experts")], 4).indices.tolist())


def test_latency_budget_uses_the_measured_table():
    from hfprune.pruning.latency import measure

    model = _llama()
    table = measure(model, batch_size=2, seq_len=8, points=2, repeats=1)
    config = SearchConfig(budget="latency", ratio=0.8, axes=("depth", "heads", "ffn"), eval_examples=4,
                          grid={"depth": [1, 0.75], "heads": [1]})
    result = search(model, _data(), config, latency_table=table, apply=False)
    for row in result.rows:
        plan = hfprune.PrunePlan.from_dict(row["plan"])
        kept = [i for i, layer in enumerate(plan.layers) if not layer.drop]
        counts = {k: 0 if k[1] not in kept else (row["shape"]["ffn"] if k[2] == "ffn" else 6) for k in table.entries}
        assert table.predict(counts) <= 0.8 * table.dense() + 1e-12
        assert row["latency"] == pytest.approx(table.predict(counts))


def test_cli_distils_the_finalists(tmp_path, capsys):
    from hfprune.pipeline.cli import main

    text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    rc = main(["search", str(tmp_path / "dense"), "--output", str(out), "--params_ratio", "0.75",
               "--data_files", str(text), "--max_length", "16", "--calibration_rows", "8", "--eval_rows", "4",
               "--grid", "depth=1,0.75", "--grid", "hidden=1", "--distill_steps", "3", "--distill_finalists", "2",
               "--distill_lr", "1e-3", "--no-plots"])
    assert rc == 0 and "distilled" in capsys.readouterr().out
    table = json.loads((out / "search_candidates.json").read_text())
    rows = table["candidates"]
    assert "distilled_score" in rows[0] and "distilled_score" in rows[1] and "distilled_score" not in rows[2]
    chosen = rows[table["chosen"]]
    assert chosen["distilled_score"] == min(rows[0]["distilled_score"], rows[1]["distilled_score"])
    assert chosen["distilled_score"] != chosen["score"]  # trained: the weights moved
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == chosen["params"]
    assert not (out / "search_candidates.png").exists()


@pytest.mark.parametrize("obj", [SearchConfig, search], ids=lambda o: o.__name__)
def test_the_docstring_example_holds(obj):
    import doctest

    # the fences of the docstring's markdown code block are not part of the expected output
    text = "\n".join(line for line in obj.__doc__.splitlines() if not line.strip().startswith("```"))
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(text, {}, obj.__name__, None, 0))
    assert runner.failures == 0 and runner.tries > 0

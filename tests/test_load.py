"""``hfprune.from_pretrained`` loads every checkpoint hfprune writes without running the checkpoint's code; it
refuses checkpoints whose plan files and weights disagree; plans record the dense model; re-pruning composes.

(Every family's outputs through ``hfprune.from_pretrained`` are compared in tests/test_save_reload.py.)
"""

import json
import logging
import shutil

import pytest
import torch
import transformers as T
from transformers import dynamic_module_utils

import hfprune
from hfprune import PrunePlan
from hfprune.core.apply import model_dims
from hfprune.core.checkpoint.classes import HfprunedModel, original_class
from hfprune.core.checkpoint.save import CODE_FILES, MODELING_FILE, PLAN_FILE

from .cases import CASES

HETERO = {"layers": [{"heads": [0, 1], "ffn": list(range(20))}, {"heads": [1, 2, 3], "ffn": list(range(5, 30))},
                     {"drop": True}]}
OTHER = {"layers": [{"heads": [2], "ffn": list(range(9))}, {"heads": [0, 3], "ffn": list(range(3, 33))},
                    {"drop": True}]}
UNIFORM = {"layers": [{"ffn": list(range(19))}, {"ffn": list(range(10, 29))}, {"drop": True}]}
# Llama cases: 4 query heads in 2 key/value groups, {0, 1} and {2, 3}
LLAMA_HETERO = {"layers": [{"heads": [0, 1], "ffn": list(range(20))}, {"heads": [0, 2], "ffn": list(range(5, 30))},
                           {"drop": True}]}
LLAMA_OTHER = {"layers": [{"heads": [2, 3], "ffn": list(range(9))}, {"heads": [1, 3], "ffn": list(range(3, 33))},
                          {"drop": True}]}
LLAMA_UNIFORM = {"layers": [{"heads": [0, 1], "ffn": list(range(20))}, {"heads": [2, 3], "ffn": list(range(17, 37))},
                            {"drop": True}]}


@pytest.fixture
def no_remote_code(monkeypatch):
    """Any attempt to import a checkpoint's code fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a checkpoint's code was imported: {args[:2]}")

    monkeypatch.setattr(dynamic_module_utils, "get_class_from_dynamic_module", refuse)
    monkeypatch.setattr(T.models.auto.auto_factory, "get_class_from_dynamic_module", refuse, raising=False)


def _build(model_type="bert", seed=0):
    torch.manual_seed(seed)
    return CASES[model_type].build("eager").eval()


def _pruned(tmp_path, plan, model_type="bert", name="ckpt", seed=0):
    model = hfprune.apply_plan(_build(model_type, seed), plan)
    model.save_pretrained(tmp_path / name)
    return model.eval(), tmp_path / name


def _out(model, model_type="bert"):
    with torch.no_grad():
        return model(**CASES[model_type].inputs(0)).logits


def _assert_same(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def _edit(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- loading ---------------------------------------------------------------------------------------


def test_heterogeneous_checkpoint_loads_without_its_code(tmp_path, no_remote_code):
    model, directory = _pruned(tmp_path, HETERO)
    assert (directory / MODELING_FILE).is_file()
    loaded = hfprune.from_pretrained(directory).eval()
    assert isinstance(loaded, HfprunedModel) and original_class(loaded) is T.BertForSequenceClassification
    assert "auto_map" not in loaded.config.to_dict()
    _assert_same(_out(loaded), _out(model))
    assert loaded.hfprune_plan == model.hfprune_plan and loaded.hfprune_heterogeneous
    assert loaded.hfprune_plan.dense == model.hfprune_plan.dense
    via_auto = hfprune.AutoPrunedModel.from_pretrained(directory, model_class=T.AutoModelForSequenceClassification)
    _assert_same(_out(via_auto.eval()), _out(model))
    base = hfprune.from_pretrained(directory, model_class=T.AutoModel)
    assert original_class(base) is T.BertModel and model_dims(base) == model_dims(model)


def test_trust_remote_code_is_refused(tmp_path):
    _, directory = _pruned(tmp_path, HETERO)
    with pytest.raises(ValueError, match="never runs code from a checkpoint.*Drop the argument"):
        hfprune.from_pretrained(directory, trust_remote_code=True)
    with pytest.raises(OSError, match="not instantiated"):
        hfprune.AutoPrunedModel()


def test_plain_and_stock_checkpoints_load_as_stock(tmp_path, no_remote_code):
    model, directory = _pruned(tmp_path, UNIFORM)
    assert not (directory / MODELING_FILE).exists()
    loaded = hfprune.from_pretrained(directory).eval()
    assert original_class(loaded) is T.BertForSequenceClassification and not loaded.hfprune_heterogeneous
    assert loaded.hfprune_plan == model.hfprune_plan and loaded.hfprune_plan.dense == model.hfprune_plan.dense
    _assert_same(_out(loaded), _out(model))

    _build().save_pretrained(tmp_path / "dense")
    stock = hfprune.from_pretrained(tmp_path / "dense")
    assert type(stock) is T.BertForSequenceClassification and not hasattr(stock, "hfprune_plan")


def test_unknown_class_is_named(tmp_path):
    _, directory = _pruned(tmp_path, HETERO)
    _edit(directory / "config.json", lambda c: c.update(architectures=["BertForTimeTravel"]))
    with pytest.raises(ValueError, match="architectures names BertForTimeTravel, which transformers .* does not"):
        hfprune.from_pretrained(directory)


# -- consistency -----------------------------------------------------------------------------------


def test_edited_prune_plan_json_is_refused(tmp_path):
    _, directory = _pruned(tmp_path, HETERO)
    _edit(directory / PLAN_FILE, lambda p: p["layers"][1].update(ffn=list(range(4, 30))))
    with pytest.raises(ValueError, match=r"layers\[1\]\.ffn: prune_plan\.json keeps 26 .* config\.json's "
                                         r"hfprune\.plan keeps 25"):
        hfprune.from_pretrained(directory)


def test_edited_config_plan_is_refused(tmp_path):
    _, directory = _pruned(tmp_path, HETERO)
    _edit(directory / "config.json", lambda c: c["hfprune"]["plan"]["layers"][0].update(heads=[0, 3]))
    with pytest.raises(ValueError, match=r"layers\[0\]\.heads: prune_plan\.json keeps 2 \[0, 1\], "
                                         r"config\.json's hfprune\.plan keeps 2 \[0, 3\]"):
        hfprune.from_pretrained(directory)


def test_weights_of_another_pruning_are_refused(tmp_path):
    _, directory = _pruned(tmp_path, HETERO)
    _, other = _pruned(tmp_path, OTHER, name="other")
    shutil.copy(other / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(ValueError, match=r"size mismatch for .*layer\.0\.attention\.self\.query\.weight: "
                                         r"checkpoint \[8, 32\] vs model \[16, 32\]"):
        hfprune.from_pretrained(directory)


def test_plain_checkpoint_plan_is_checked_against_the_config(tmp_path):
    _, directory = _pruned(tmp_path, UNIFORM)
    _edit(directory / PLAN_FILE, lambda p: p["layers"][1].update(ffn=list(range(10, 30))))
    with pytest.raises(ValueError, match=r"layers\[1\]\.ffn: prune_plan\.json leaves \[20\] neurons, the "
                                         r"checkpoint's config and weights have \[19\]"):
        hfprune.from_pretrained(directory)
    _edit(directory / PLAN_FILE, lambda p: p["layers"].__setitem__(2, {}))
    with pytest.raises(ValueError, match="keeps 3 of the 3 layers of 'layers' but the checkpoint has 2"):
        hfprune.from_pretrained(directory)


def test_missing_prune_plan_json_trusts_the_config(tmp_path, caplog):
    model, directory = _pruned(tmp_path, HETERO)
    (directory / PLAN_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        loaded = hfprune.from_pretrained(directory).eval()
    assert "has no prune_plan.json; trusting config.json" in caplog.text
    _assert_same(_out(loaded), _out(model))


# -- the plan records the dense model ----------------------------------------------------------------


def test_plan_records_dense_dims_everywhere(tmp_path):
    dense = _build()
    dims = model_dims(dense)
    model, directory = _pruned(tmp_path, HETERO)
    assert PrunePlan.from_dict({"layers": [{}], "dense": {"layers": [dims["layers"][0]]}}).dense is not None
    assert model.hfprune_plan.dense == {"layers": tuple(dims["layers"])}
    saved = PrunePlan.from_json(directory / PLAN_FILE)  # prune_plan.json, with its hfprune_version, reads back
    record = PrunePlan.from_dict(json.loads((directory / "config.json").read_text())["hfprune"]["plan"])
    assert saved == record == model.hfprune_plan and saved.dense == record.dense == model.hfprune_plan.dense


def test_a_plan_for_another_dense_model_is_refused():
    plan = PrunePlan.from_dict(HETERO).with_dense({"layers": [{"heads": (4, 4), "ffn": (50,)}] * 3})
    model = _build()
    with pytest.raises(hfprune.PlanError, match="dense dimensions .* not this model's"):
        hfprune.apply_plan(model, plan)
    assert type(model) is T.BertForSequenceClassification  # refused before anything changed
    hfprune.apply_plan(model, plan.with_dense(model_dims(model)))


# -- shared configs ---------------------------------------------------------------------------------


def test_models_sharing_a_config_are_pruned_independently(tmp_path):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=37, max_position_embeddings=64)
    first, second = T.LlamaForCausalLM(config), T.LlamaForCausalLM(config)
    assert second.config is first.config
    before = config.to_dict()
    hfprune.apply_plan(first, LLAMA_HETERO)
    assert second.config is config and config.to_dict() == before and not hasattr(config, "hfprune")
    assert all(m.config is first.config for m in first.modules() if "config" in vars(m))
    assert first.config.num_hidden_layers == 2 and second.config.num_hidden_layers == 3
    ids = torch.randint(3, 99, (1, 5))
    with torch.no_grad():
        second(input_ids=ids)  # still runs as the dense model it is
    hfprune.apply_plan(second, LLAMA_OTHER)
    second.save_pretrained(tmp_path / "second")
    saved = PrunePlan.from_json(tmp_path / "second" / PLAN_FILE)
    assert saved.to_dict()["layers"] == PrunePlan.from_dict(LLAMA_OTHER).to_dict()["layers"]
    assert first.hfprune_plan.to_dict()["layers"] == PrunePlan.from_dict(LLAMA_HETERO).to_dict()["layers"]


# -- re-pruning ---------------------------------------------------------------------------------------


SECOND = {"layers": [{"heads": [1], "ffn": list(range(0, 20, 2))}, {"heads": [1], "ffn": list(range(12))}]}


@pytest.mark.parametrize("how", ["remote_code", "hfprune"])
def test_reloaded_checkpoint_prunes_again_and_composes(tmp_path, how):
    first, directory = _pruned(tmp_path, LLAMA_HETERO, "llama")
    if how == "remote_code":
        loaded = T.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
        assert type(loaded).__module__.startswith("transformers_modules.")
    else:
        loaded = hfprune.from_pretrained(directory)
    again = hfprune.apply_plan(loaded.eval(), SECOND)
    assert original_class(again) is T.LlamaForCausalLM
    expected = hfprune.apply_plan(_build("llama"), LLAMA_HETERO)
    expected = hfprune.apply_plan(expected, SECOND)  # the same two steps on the dense model, in memory
    assert again.hfprune_plan == expected.hfprune_plan
    assert again.hfprune_plan.dense == first.hfprune_plan.dense == {"layers": tuple(model_dims(_build("llama"))[
        "layers"])}
    assert again.hfprune_plan.to_dict()["layers"][0] == {"heads": [1], "ffn": list(range(0, 20, 2))}
    again.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfprune.LlamaForCausalLM"
    for reloaded in (hfprune.from_pretrained(tmp_path / "again"),
                     T.AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)):
        _assert_same(_out(reloaded.eval(), "llama"), _out(again, "llama"))
        _assert_same(_out(reloaded, "llama"), _out(expected.eval(), "llama"))


def test_plain_checkpoint_pruned_again_to_per_layer_widths(tmp_path, no_remote_code):
    first, directory = _pruned(tmp_path, LLAMA_UNIFORM, "llama")
    assert not first.hfprune_heterogeneous
    loaded = hfprune.from_pretrained(directory)
    assert loaded.config.num_attention_heads == 2 and loaded.config.intermediate_size == 20
    again = hfprune.apply_plan(loaded, {"layers": [{"ffn": list(range(7))}, {"heads": [0]}]})
    assert again.hfprune_heterogeneous
    # the record holds the whole plan, relative to the dense model, whose widths the config states again
    assert again.config.num_attention_heads == 4 and again.config.intermediate_size == 37
    assert again.hfprune_plan.to_dict()["layers"] == [
        {"heads": [0, 1], "ffn": list(range(7))}, {"heads": [2], "ffn": list(range(17, 37))}, {"drop": True}]
    again.save_pretrained(tmp_path / "again")
    reloaded = hfprune.from_pretrained(tmp_path / "again").eval()
    _assert_same(_out(reloaded, "llama"), _out(again.eval(), "llama"))
    assert reloaded.hfprune_plan.dense == first.hfprune_plan.dense


# -- hfprune's own commands -----------------------------------------------------------------------------


def _bert_8_heads(plan):
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                          intermediate_size=256, max_position_embeddings=64, num_labels=2)
    return hfprune.apply_plan(T.BertForSequenceClassification(config), plan)


@pytest.mark.parametrize("how", ["save_pretrained", "plain", "trainer"])
def test_report_shows_the_dense_sizes(tmp_path, how, no_remote_code):
    from hfprune.pipeline.report import report

    if how == "plain":
        model = _bert_8_heads({"layers": [{"ffn": list(range(112))}, {"ffn": list(range(100, 212))}]})
    else:
        model = _bert_8_heads({"layers": [{"heads": [0, 2, 4, 6], "ffn": list(range(112))}, {"heads": [1]}]})
    if how == "trainer":
        args = T.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[])
        T.Trainer(model=model, args=args).save_model(str(tmp_path / "ckpt"))
    else:
        model.save_pretrained(tmp_path / "ckpt")
    text, _ = report(tmp_path / "ckpt", plots=False)
    if how == "plain":  # every layer 112 wide: the widest layer is no stand-in for the dense size
        assert "| layer 0 | 8 / 8 | 112 / 256 |" in text and "| layer 1 | 8 / 8 | 112 / 256 |" in text, text
    else:
        assert "| layer 0 | 4 / 8 | 112 / 256 |" in text and "| layer 1 | 1 / 8 | 256 / 256 |" in text, text


def test_card_base_model_is_a_hub_id_or_absent(tmp_path):
    from hfprune.pipeline.card import card_data

    base = {"metrics": {}, "params": {"after": 1}, "macs": {"after": 1, "seq_len": 8}}
    assert card_data({**base, "base_model": "asset:minilm"}).base_model is None
    assert card_data({**base, "base_model": str(tmp_path)}).base_model is None
    assert card_data({**base, "base_model": "hfprune.data.teachers:movie_review_teacher"}).base_model is None
    assert card_data({**base, "base_model": "asset:minilm", "base_model_id": "org/dense"}).base_model == "org/dense"
    assert card_data({**base, "base_model": "org/dense"}).base_model == "org/dense"


def test_card_of_a_saved_checkpoint_names_the_hub_model_it_came_from(tmp_path):
    from hfprune.pipeline.card import build_card

    dense = _build()
    dense.config._name_or_path = "org/tiny-bert"  # as loading by the Hub id org/tiny-bert sets it
    hfprune.apply_plan(dense, HETERO).save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / PLAN_FILE).read_text())["base_model"] == "org/tiny-bert"
    card = build_card(tmp_path / "ckpt")
    assert card.data.base_model == "org/tiny-bert"
    assert 'hfprune.from_pretrained("REPO_ID")' in card.text and "trust_remote_code=True" in card.text


def test_run_loads_pruned_checkpoints_without_their_code(tmp_path, no_remote_code):
    from hfprune.pipeline.recipe import load_recipe
    from hfprune.pipeline.run import load_model

    model, directory = _pruned(tmp_path, HETERO)
    recipe = load_recipe({"name": "again", "method": "oneshot",
                          "model": {"path": str(directory), "task": "text-classification"},
                          "pruning": {"criterion": "magnitude", "macs_ratio": 0.5},
                          "output": {"dir": str(tmp_path / "out")}})
    loaded = load_model(recipe, directory).eval()
    _assert_same(_out(loaded), _out(model))
    assert loaded.hfprune_plan == model.hfprune_plan


def test_push_refuses_an_inconsistent_checkpoint(tmp_path):
    from hfprune.pipeline.hub import HubPushError, check_checkpoint

    _, directory = _pruned(tmp_path, HETERO)
    check_checkpoint(directory)
    _edit(directory / PLAN_FILE, lambda p: p["layers"].__setitem__(0, {"drop": True}))
    with pytest.raises(HubPushError, match=r"inconsistent checkpoint: .*layers\[0\]: prune_plan\.json drops"):
        check_checkpoint(directory)


def test_load_by_repo_id_from_the_hub(tmp_path, monkeypatch, no_remote_code):
    from huggingface_hub import HfApi, constants

    from .hub_server import TOKEN, HubServer

    model, directory = _pruned(tmp_path, HETERO)
    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo("tester/pruned", private=True)
        api.create_branch("tester/pruned", branch="v1")
        api.upload_folder(repo_id="tester/pruned", folder_path=str(directory), revision="v1")
        loaded = hfprune.from_pretrained("tester/pruned", revision="v1", token=TOKEN, cache_dir=tmp_path / "cache")
        files = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert not files & set(CODE_FILES) and "model.safetensors" in files  # the code is not even downloaded
    _assert_same(_out(loaded.eval()), _out(model))
    assert loaded.hfprune_plan == model.hfprune_plan


def test_prune_command_prunes_a_pruned_checkpoint_again(tmp_path, no_remote_code, capsys):
    import contextlib
    import io

    from hfprune.pipeline.cli import main

    from .cases import random_plan

    dense = _build("patchtst")
    first, directory = _pruned(tmp_path, random_plan(dense, 0), "patchtst")
    assert first.hfprune_heterogeneous
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["prune", "--model_dir", str(directory), "--output_dir", str(tmp_path / "again"), "--task",
                   "forecasting", "--criterion", "magnitude", "--ffn_ratio", "0.5", "--latency", "false"])
    assert rc == 0, capsys.readouterr().err
    again = PrunePlan.from_json(tmp_path / "again" / PLAN_FILE)
    assert again.dense == first.hfprune_plan.dense == {"layers": tuple(model_dims(dense)["layers"])}
    for before, after in zip(first.hfprune_plan.layers, again.layers):  # composed: a subset of what was kept
        if not before.drop and before.get("ffn") is not None:
            assert set(after.get("ffn")) <= set(before.get("ffn"))
    reloaded = hfprune.from_pretrained(tmp_path / "again")
    assert reloaded.hfprune_plan == again


def test_checkpoint_from_before_plans_recorded_dense_sizes(tmp_path, no_remote_code):
    model, directory = _pruned(tmp_path, LLAMA_HETERO, "llama")
    _edit(directory / "config.json", lambda c: c["hfprune"]["plan"].pop("dense"))
    _edit(directory / PLAN_FILE, lambda p: p.pop("dense"))
    loaded = hfprune.from_pretrained(directory).eval()
    # the record is relative to the widths config.json states: those are the dense ones
    assert loaded.hfprune_plan.dense == model.hfprune_plan.dense
    _assert_same(_out(loaded, "llama"), _out(model, "llama"))
    loaded.save_pretrained(tmp_path / "resaved")
    assert PrunePlan.from_json(tmp_path / "resaved" / PLAN_FILE).dense == model.hfprune_plan.dense

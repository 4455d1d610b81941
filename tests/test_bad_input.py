"""Every bad input is a clear error, raised before the model or the disk is touched.

One table per surface (the Python API, recipes, the command line). Each case names the exception it expects and a
piece of text the message must contain (the bad value's repr or its key); every case also checks that no model
changed (weights, config, train/eval mode, hooks) and that a folder of files (listing and hashes) is as it was.
Loading a model or data is forbidden for the whole module: validation that came after loading would fail here.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as T
import yaml

import hfprune
import hfprune.data.teachers
import hfprune.pipeline.run
from hfprune import PlanError, PrunePlan, PruningConfig
from hfprune.distill import DistillationConfig
from hfprune.pipeline.cli import main
from hfprune.pipeline.recipe import DEFAULT_RECIPE_YAML, RecipeError, load_recipe
from hfprune.pipeline.sweep import sweep
from hfprune.pipeline.tasks import TASKS
from hfprune.pruning.callback import PruningCallback
from hfprune.pruning.schedule import ScheduleConfig

from .cases import CASES
from .cases_nlp import VOCAB


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable  # (ctx) -> anything; must raise
    error: type
    names: str  # text the message must contain: the bad value's repr or the key


# ---- fixtures: models built once, a folder whose files must not change ------------------------------------------


class Context:
    """Tiny models (built on first use, once per module) and a folder with a few files."""

    BUILDERS = {
        "bert": lambda: CASES["bert"].build("eager"),
        "gpt2": lambda: CASES["gpt2"].build("eager"),
        "llama": lambda: CASES["llama"].build("eager"),
        "vit": lambda: CASES["vit"].build("eager"),
        "patchtst": lambda: CASES["patchtst"].build("eager"),
        "tst": lambda: CASES["time_series_transformer"].build("eager"),
        "albert": lambda: T.AlbertModel(T.AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16,
                                                       num_attention_heads=2, intermediate_size=16,
                                                       num_hidden_layers=1)),
    }

    def __init__(self, root):
        self.root = root
        self.models: dict = {}

    def __getattr__(self, name):
        if name not in Context.BUILDERS:
            raise AttributeError(name)
        if name not in self.models:
            torch.manual_seed(0)
            self.models[name] = Context.BUILDERS[name]()
        return self.models[name]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "config.json").write_text("{}")
    (root / "trainer-out").mkdir()
    (root / "afile.txt").write_text("not a folder\n")
    (root / "plan.json").write_text(json.dumps({"layers": [{}, {}, {}]}))
    (root / "broken.yaml").write_text("name: x\npruning: {macs_ratio: [0.5\n")
    (root / "dup.yaml").write_text("name: dup\npruning:\n  macs_ratio: 0.5\n  macs_ratio: 0.3\n")
    (root / "list.yaml").write_text("- name\n- pruning\n")
    return Context(root)


def forbidden(*args, **kwargs):
    raise AssertionError("a model or data set was loaded before the input was refused")


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    """Loading a model, tokenizer or dataset is an error here: every check must come first. Forbidden at every
    door: the run module's steps (which run and sweep call through the module), each task's own loading methods,
    and the data loaders and the fine-tune stage behind them."""
    for name in ("load_model", "load_tokenizer", "load_data", "read_data", "finetune"):
        monkeypatch.setattr(hfprune.pipeline.run, name, forbidden)
    for task in TASKS.values():
        for name in ("load_model", "load_tokenizer", "prepare_data"):
            monkeypatch.setattr(task, name, forbidden)
    monkeypatch.setattr(hfprune.data.teachers, "movie_review_teacher", forbidden)


def model_state(model) -> tuple:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return weights, json.dumps(model.config.to_dict(), sort_keys=True, default=str), model.training, hooks


def disk_state(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def assert_untouched(ctx, models_before: dict, disk_before: dict) -> None:
    for name, (weights, config, training, hooks) in models_before.items():
        now = model_state(ctx.models[name])
        assert now[0].keys() == weights.keys(), f"{name}: parameters added or removed"
        assert all(torch.equal(now[0][k], v) for k, v in weights.items()), f"{name}: weights changed"
        assert now[1:] == (config, training, hooks), f"{name}: config, mode or hooks changed"
    assert disk_state(ctx.root) == disk_before, "files were written or changed"


def check_refused(ctx, bad: Bad) -> str:
    for name in _models_used(bad):
        getattr(ctx, name)  # build before the snapshot, so a first use inside the call is not a change
    models_before = {name: model_state(m) for name, m in ctx.models.items()}
    disk_before = disk_state(ctx.root)
    with pytest.raises(bad.error) as err:
        bad.call(ctx)
    message = str(err.value)
    assert bad.names in message, f"the message does not name {bad.names!r}: {message}"
    assert_untouched(ctx, models_before, disk_before)
    return message


def _models_used(bad: Bad) -> list:
    names = bad.call.__code__.co_names
    return [n for n in Context.BUILDERS if n in names]


# ---- data helpers ----------------------------------------------------------------------------------------------


def ids(low=3, high=VOCAB, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0))


def text_batch(**changes) -> dict:
    batch = {"input_ids": ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


def dataset(**columns):
    import datasets

    return datasets.Dataset.from_dict(columns)


def fisher(**kwargs) -> PruningConfig:
    return PruningConfig(criterion="fisher", **({"macs_ratio": 0.5} | kwargs))


def magnitude(**kwargs) -> PruningConfig:
    return PruningConfig(criterion="magnitude", **({"macs_ratio": 0.5} | kwargs))


# ---- the Python API --------------------------------------------------------------------------------------------


def _config(id_, kwargs, names, error=ValueError):
    return Bad(f"PruningConfig-{id_}", lambda c: PruningConfig(**{"criterion": "magnitude", **kwargs}), error, names)


CONFIG = [
    _config("macs_ratio-str", {"macs_ratio": "0.5"}, "macs_ratio='0.5'"),
    _config("macs_ratio-True", {"macs_ratio": True}, "macs_ratio=True"),
    _config("macs_ratio-False", {"macs_ratio": False}, "macs_ratio=False"),
    _config("macs_ratio-zero", {"macs_ratio": 0}, "macs_ratio=0"),
    _config("macs_ratio-negative", {"macs_ratio": -0.2}, "macs_ratio=-0.2"),
    _config("macs_ratio-above-one", {"macs_ratio": 1.5}, "macs_ratio=1.5"),
    _config("macs_ratio-percent", {"macs_ratio": 60}, "macs_ratio=60"),
    _config("macs_ratio-nan", {"macs_ratio": float("nan")}, "macs_ratio=nan"),
    _config("macs_ratio-inf", {"macs_ratio": float("inf")}, "macs_ratio=inf"),
    _config("macs_ratio-list", {"macs_ratio": [0.5]}, "macs_ratio=[0.5]"),
    _config("macs_ratio-tensor", {"macs_ratio": torch.tensor(0.5)}, "macs_ratio=tensor(0.5000)"),
    _config("params_ratio-word", {"params_ratio": "half"}, "params_ratio='half'"),
    _config("latency_ratio-above-one", {"latency_ratio": 2}, "latency_ratio=2"),
    _config("head_ratio-True", {"head_ratio": True}, "head_ratio=True"),
    _config("ffn_ratio-negative", {"ffn_ratio": -1}, "ffn_ratio=-1"),
    _config("no-budget", {}, "got none"),
    _config("two-budgets", {"macs_ratio": 0.5, "params_ratio": 0.5}, "['macs_ratio', 'params_ratio']"),
    _config("macs-and-head-ratio", {"macs_ratio": 0.5, "head_ratio": 0.5}, "'head_ratio'"),
    _config("criterion-unknown", {"criterion": "l1", "macs_ratio": 0.5}, "criterion='l1'"),
    _config("criterion-None", {"criterion": None, "macs_ratio": 0.5}, "criterion=None"),
    _config("criterion-list", {"criterion": ["fisher"], "macs_ratio": 0.5}, "criterion=['fisher']"),
    _config("criterion-capitalised", {"criterion": "Fisher", "macs_ratio": 0.5}, "criterion='Fisher'"),
    _config("scope-unknown", {"scope": "layerwise", "macs_ratio": 0.5}, "scope='layerwise'"),
    _config("scope-list", {"scope": ["global"], "macs_ratio": 0.5}, "scope=['global']"),
    _config("scope-per_layer-with-macs", {"scope": "per_layer", "macs_ratio": 0.5}, "scope='per_layer'"),
    _config("normalize-unknown", {"normalize": "max", "macs_ratio": 0.5}, "normalize='max'"),
    _config("recovery-unknown", {"recovery": "magic", "macs_ratio": 0.5}, "recovery='magic'"),
    _config("recovery-rearrange-not-fisher", {"recovery": "rearrange", "macs_ratio": 0.5}, "recovery='rearrange'"),
    _config("bias_compensation-str", {"bias_compensation": "yes", "macs_ratio": 0.5}, "bias_compensation='yes'"),
    _config("bias_compensation-with-lstsq", {"bias_compensation": True, "recovery": "lstsq", "macs_ratio": 0.5},
            "recovery='lstsq'"),
    _config("allow_empty-int", {"allow_empty": 1, "macs_ratio": 0.5}, "allow_empty=1"),
    _config("seq_len-zero", {"seq_len": 0, "macs_ratio": 0.5}, "seq_len=0"),
    _config("seq_len-float", {"seq_len": 12.5, "macs_ratio": 0.5}, "seq_len=12.5"),
    _config("seq_len-str", {"seq_len": "128", "macs_ratio": 0.5}, "seq_len='128'"),
    _config("seq_len-True", {"seq_len": True, "macs_ratio": 0.5}, "seq_len=True"),
    _config("latency_batch_size-negative", {"latency_batch_size": -4, "latency_ratio": 0.5},
            "latency_batch_size=-4"),
    _config("round_to-zero", {"round_to": 0, "head_ratio": 0.5}, "round_to=0"),
    _config("round_to-float", {"round_to": 8.0, "head_ratio": 0.5}, "round_to=8.0"),
    _config("min_heads-negative", {"min_heads": -1, "macs_ratio": 0.5}, "min_heads=-1"),
    _config("min_heads-None", {"min_heads": None, "macs_ratio": 0.5}, "min_heads=None"),
    _config("recovery_examples-zero", {"recovery_examples": 0, "macs_ratio": 0.5}, "recovery_examples=0"),
    _config("recovery_examples-all", {"recovery_examples": "all", "macs_ratio": 0.5}, "recovery_examples='all'"),
    _config("calibration_batch_size-zero", {"calibration_batch_size": 0, "macs_ratio": 0.5},
            "calibration_batch_size=0"),
    _config("seed-float", {"seed": 0.5, "macs_ratio": 0.5}, "seed=0.5"),
    _config("seed-str", {"seed": "0", "macs_ratio": 0.5}, "seed='0'"),
]


def _schedule(id_, kwargs, names, error=ValueError):
    return Bad(f"ScheduleConfig-{id_}", lambda c: ScheduleConfig(**kwargs), error, names)


SCHEDULE = [
    _schedule("kind-unknown", {"kind": "cubic"}, "kind='cubic'"),
    _schedule("kind-None", {"kind": None}, "kind=None"),
    _schedule("start_step-negative", {"start_step": -1}, "start_step=-1"),
    _schedule("start_step-float", {"start_step": 1.5}, "start_step=1.5"),
    _schedule("start_step-True", {"start_step": True}, "start_step=True"),
    _schedule("end_step-str", {"end_step": "10"}, "end_step='10'"),
    _schedule("end_step-not-after-start", {"start_step": 5, "end_step": 5}, "end_step=5"),
    _schedule("rounds-zero", {"kind": "iterative", "rounds": 0}, "rounds=0"),
    _schedule("every-zero", {"every": 0}, "every=0"),
    Bad("ScheduleConfig-from_dict-unknown-key", lambda c: ScheduleConfig.from_dict({"kind": "gradual", "steps": 3}),
        ValueError, "['steps']"),
    Bad("ScheduleConfig-from_dict-list", lambda c: ScheduleConfig.from_dict(["gradual"]), TypeError, "['gradual']"),
]


def _distill(id_, kwargs, names, error=ValueError):
    return Bad(f"DistillationConfig-{id_}", lambda c: DistillationConfig(**kwargs), error, names)


DISTILL = [
    _distill("temperature-zero", {"temperature": 0}, "temperature=0"),
    _distill("temperature-True", {"temperature": True}, "temperature=True"),
    _distill("temperature-str", {"temperature": "2"}, "temperature='2'"),
    _distill("temperature-inf", {"temperature": float("inf")}, "temperature=inf"),
    _distill("alpha-above-one", {"alpha": 1.5}, "alpha=1.5"),
    _distill("alpha-str", {"alpha": "0.5"}, "alpha='0.5'"),
    _distill("alpha-True", {"alpha": True}, "alpha=True"),
    _distill("hidden_weight-negative", {"hidden_weight": -1}, "hidden_weight=-1"),
    _distill("hidden_weight-nan", {"hidden_weight": float("nan")}, "hidden_weight=nan"),
    _distill("loss-unknown", {"loss": "ce"}, "loss='ce'"),
    _distill("loss-None", {"loss": None}, "loss=None"),
    _distill("teacher_dtype-unknown", {"teacher_dtype": "int8"}, "teacher_dtype='int8'"),
    _distill("teacher_dtype-torch-dtype", {"teacher_dtype": torch.float16}, "teacher_dtype=torch.float16"),
    _distill("teacher_device-unknown", {"teacher_device": "gpu0"}, "teacher_device='gpu0'"),
    _distill("teacher_device-int", {"teacher_device": 0}, "teacher_device=0"),
    _distill("layer_map-list", {"layer_map": [1, 2]}, "layer_map=[1, 2]"),
    _distill("layer_map-empty", {"layer_map": {}}, "layer_map={}"),
    _distill("layer_map-word-key", {"layer_map": {"a": 1}}, "layer_map={'a': 1}"),
    _distill("layer_map-bool-value", {"layer_map": {1: True}}, "layer_map={1: True}"),
    _distill("layer_map-float-key", {"layer_map": {1.5: 2}}, "layer_map={1.5: 2}"),
    _distill("layer_map-negative", {"layer_map": {1: -2}}, "layer_map={1: -2}"),
]


def _prune(id_, call, error, names):
    return Bad(f"prune-{id_}", call, error, names)


def _batches(*batches):
    return list(batches)


PRUNE = [
    _prune("config-dict", lambda c: hfprune.prune(c.bert, None, {"criterion": "magnitude", "macs_ratio": 0.5}),
           TypeError, "PruningConfig(**config)"),
    _prune("config-None", lambda c: hfprune.prune(c.bert, None, None), TypeError, "NoneType"),
    _prune("config-yaml-text", lambda c: hfprune.prune(c.bert, None, "macs_ratio: 0.5"), TypeError,
           "'macs_ratio: 0.5'"),
    _prune("config-ScheduleConfig", lambda c: hfprune.prune(c.bert, None, ScheduleConfig()), TypeError,
           "ScheduleConfig"),
    _prune("model-plain-module", lambda c: hfprune.prune(torch.nn.Linear(4, 4), None, magnitude()), TypeError,
           "Linear"),
    _prune("model-None", lambda c: hfprune.prune(None, None, magnitude()), TypeError, "NoneType"),
    _prune("model-hub-id", lambda c: hfprune.prune("bert-base-uncased", None, magnitude()), TypeError, "str"),
    _prune("model-unsupported-type", lambda c: hfprune.prune(c.albert, None, magnitude()), ValueError, "'albert'"),
    _prune("calibration-tensor", lambda c: hfprune.prune(c.bert, ids(), fisher()), TypeError, "shape (2, 7)"),
    _prune("calibration-one-batch", lambda c: hfprune.prune(c.bert, text_batch(), fisher()), TypeError,
           "['input_ids', 'attention_mask']"),
    _prune("calibration-DatasetDict", lambda c: hfprune.prune(
        c.bert, __import__("datasets").DatasetDict(train=dataset(input_ids=[[5, 6]])), fisher()), TypeError,
        "['train']"),
    _prune("calibration-path", lambda c: hfprune.prune(c.bert, "calib.jsonl", fisher()), TypeError,
           "'calib.jsonl'"),
    _prune("calibration-int", lambda c: hfprune.prune(c.bert, 5, fisher()), TypeError, "int 5"),
    _prune("calibration-empty-list", lambda c: hfprune.prune(c.bert, [], fisher()), ValueError, "empty"),
    _prune("calibration-empty-generator", lambda c: hfprune.prune(c.bert, (b for b in []), fisher()), ValueError,
           "empty"),
    _prune("calibration-list-of-tensors", lambda c: hfprune.prune(c.bert, [ids()], fisher()), TypeError,
           "calibration[0] is a Tensor"),
    _prune("batch-wrong-key", lambda c: hfprune.prune(c.bert, _batches({"ids": ids()}), fisher()), ValueError,
           "['ids']"),
    _prune("batch-label-not-labels", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(label=torch.tensor([0, 1]))), fisher()), ValueError, "'label'"),
    _prune("batch-raw-text", lambda c: hfprune.prune(
        c.bert, _batches({"text": ["a film", "a bore"], "labels": torch.tensor([1, 0])}), fisher()), ValueError,
        "['text'] hold text"),
    _prune("input_ids-float", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(input_ids=ids().float())), fisher()), ValueError, "torch.float32"),
    _prune("input_ids-one-row", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(input_ids=ids(shape=(7,)), attention_mask=None)), fisher()), ValueError,
        "shape (7,)"),
    _prune("input_ids-beyond-vocab", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(input_ids=ids(VOCAB, VOCAB + 400))), fisher()), ValueError, "token id 4"),
    _prune("input_ids-negative", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(input_ids=ids() - 200)), fisher()), ValueError, "token id -"),
    _prune("input_ids-ragged-lists", lambda c: hfprune.prune(
        c.bert, _batches({"input_ids": [[5, 6, 7], [5, 6]]}), fisher()), ValueError, "['input_ids']"),
    _prune("labels-beyond-num_labels", lambda c: hfprune.prune(
        c.bert, _batches(text_batch(labels=torch.tensor([0, 7]))), fisher()), ValueError, "label 7"),
    _prune("gpt2-labels-beyond-vocab", lambda c: hfprune.prune(
        c.gpt2, _batches(text_batch(labels=torch.full((2, 7), 500))), fisher()), ValueError, "token id 500"),
    _prune("dataset-untokenised", lambda c: hfprune.prune(
        c.bert, dataset(text=["a film", "a bore"], label=[1, 0]), fisher()), ValueError, "tokenizer="),
    _prune("dataset-without-model-inputs", lambda c: hfprune.prune(
        c.bert, dataset(x=[[1, 2], [3, 4]]), fisher()), ValueError, "['x']"),
    _prune("dataset-empty", lambda c: hfprune.prune(c.bert, dataset(input_ids=[]), fisher()), ValueError, "0 rows"),
    _prune("dataset-ids-beyond-vocab", lambda c: hfprune.prune(
        c.bert, dataset(input_ids=[[5, 500], [5, 6]]), fisher()), ValueError, "token id 500"),
    _prune("iterable-dataset", lambda c: hfprune.prune(
        c.bert, dataset(input_ids=[[5, 6]]).to_iterable_dataset(), fisher()), TypeError, "IterableDataset"),
    _prune("dataloader-wrong-key", lambda c: hfprune.prune(
        c.bert, torch.utils.data.DataLoader([{"ids": ids()[0]}] * 4, batch_size=2), fisher()), ValueError,
        "['ids']"),
    _prune("patchtst-without-past_values", lambda c: hfprune.prune(
        c.patchtst, _batches({"values": torch.randn(2, 16, 3)}), fisher()), ValueError, "past_values"),
    _prune("tst-without-time-features", lambda c: hfprune.prune(
        c.tst, _batches({"past_values": torch.randn(2, 15)}), fisher()), ValueError, "past_time_features"),
    _prune("vit-given-text", lambda c: hfprune.prune(c.vit, _batches(text_batch()), fisher()), ValueError,
           "pixel_values"),
    _prune("latency_table-str", lambda c: hfprune.prune(c.bert, None, magnitude(), latency_table="table.json"),
           TypeError, "latency_table"),
    _prune("fisher-without-data", lambda c: hfprune.prune(c.bert, None, fisher()), ValueError, "'fisher'"),
    _prune("budget-removes-everything", lambda c: hfprune.prune(c.bert, None, magnitude(macs_ratio=1e-9)),
           PlanError, "macs_ratio=1e-09"),
    _prune("budget-removes-everything-with-data", lambda c: hfprune.prune(
        c.llama, _batches(text_batch()), PruningConfig(criterion="taylor", params_ratio=1e-6)), PlanError,
        "params_ratio=1e-06"),
    _prune("ratios-remove-everything", lambda c: hfprune.prune(
        c.bert, None, PruningConfig(criterion="magnitude", head_ratio=0.1, ffn_ratio=0.01)), PlanError,
        "head_ratio=0.1"),
    _prune("min_heads-over-budget", lambda c: hfprune.prune(c.bert, None, magnitude(macs_ratio=0.1, min_heads=4)),
           PlanError, "minimum of 4"),
]

GOOD_PLAN = {"layers": [{}, {}, {}]}


def _apply(id_, call, error, names):
    return Bad(f"apply_plan-{id_}", call, error, names)


APPLY = [
    _apply("model-plain-module", lambda c: hfprune.apply_plan(torch.nn.Linear(4, 4), GOOD_PLAN), TypeError,
           "Linear"),
    _apply("model-None", lambda c: hfprune.apply_plan(None, GOOD_PLAN), TypeError, "NoneType"),
    _apply("model-unsupported-type", lambda c: hfprune.apply_plan(c.albert, {"layers": [{}]}), ValueError,
           "'albert'"),
    _apply("plan-path", lambda c: hfprune.apply_plan(c.bert, str(c.root / "plan.json")), TypeError,
           "PrunePlan.from_json"),
    _apply("plan-list", lambda c: hfprune.apply_plan(c.bert, [{}, {}, {}]), TypeError, "list"),
    _apply("plan-None", lambda c: hfprune.apply_plan(c.bert, None), TypeError, "NoneType"),
    _apply("plan-unknown-key", lambda c: hfprune.apply_plan(c.bert, {"layer": [{}, {}, {}]}), PlanError,
           "['layer']"),
    _apply("plan-layer-count", lambda c: hfprune.apply_plan(c.bert, {"layers": [{}, {}]}), PlanError, "2 entries"),
    _apply("plan-head-out-of-range", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"heads": [0, 9]}, {}, {}]}),
           PlanError, "index 9"),
    _apply("plan-negative-index", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"ffn": [-1]}, {}, {}]}),
           PlanError, "-1"),
    _apply("plan-duplicate-index", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"ffn": [1, 1]}, {}, {}]}),
           PlanError, "index 1 appears twice"),
    _apply("plan-float-index", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"ffn": [0.0]}, {}, {}]}),
           PlanError, "0.0"),
    _apply("plan-bool-index", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"heads": [True]}, {}, {}]}),
           PlanError, "True"),
    _apply("plan-heads-as-text", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"heads": "0,1"}, {}, {}]}),
           PlanError, "'0,1'"),
    _apply("plan-drop-as-text", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"drop": "yes"}, {}, {}]}),
           PlanError, "'yes'"),
    _apply("plan-unknown-block", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"mlp": [0]}, {}, {}]}),
           PlanError, "['mlp']"),
    _apply("plan-other-model_type", lambda c: hfprune.apply_plan(c.bert, {**GOOD_PLAN, "model_type": "gpt2"}),
           PlanError, "'gpt2'"),
    _apply("plan-drops-every-layer", lambda c: hfprune.apply_plan(c.bert, {"layers": [{"drop": True}] * 3}),
           PlanError, "drops all 3 layers"),
    _apply("plan-decoder-stack-on-encoder", lambda c: hfprune.apply_plan(
        c.bert, {**GOOD_PLAN, "decoder_layers": [{}]}), PlanError, "'decoder_layers'"),
    _apply("plan-uneven-gqa", lambda c: hfprune.apply_plan(c.llama, {"layers": [{"heads": [0, 1, 2]}, {}, {}]}),
           PlanError, "GQA"),
    Bad("PrunePlan.from_dict-text", lambda c: PrunePlan.from_dict('{"layers": []}'), PlanError, "str"),
    Bad("PrunePlan.from_dict-no-layers", lambda c: PrunePlan.from_dict({"decoder_layers": []}), PlanError,
        "'layers'"),
    Bad("PrunePlan.from_dict-layers-dict", lambda c: PrunePlan.from_dict({"layers": {"0": {}}}), PlanError, "dict"),
    Bad("PrunePlan.from_dict-entry-list", lambda c: PrunePlan.from_dict({"layers": [[0, 1]]}), PlanError,
        "[0, 1]"),
    Bad("PrunePlan.from_dict-drop-and-keep", lambda c: PrunePlan.from_dict({"layers": [{"drop": True,
                                                                                         "ffn": [1]}]}),
        PlanError, "['ffn']"),
]


def _begin(callback, model):
    """What Trainer.train() does before its first step: on_train_begin with the model."""
    args = T.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, max_steps=10)
    state = T.TrainerState(max_steps=10)
    return callback.on_train_begin(args, state, T.TrainerControl(), model=model)


def _cb(id_, call, error, names):
    return Bad(f"PruningCallback-{id_}", call, error, names)


CALLBACK = [
    _cb("config-dict", lambda c: PruningCallback({"criterion": "fisher", "macs_ratio": 0.5}), TypeError,
        "PruningConfig(**config)"),
    _cb("config-None", lambda c: PruningCallback(None), TypeError, "NoneType"),
    _cb("schedule-dict", lambda c: PruningCallback(fisher(), {"kind": "gradual"}), TypeError, "ScheduleConfig"),
    _cb("calibration-tensor", lambda c: PruningCallback(fisher(), calibration=ids()), TypeError, "shape (2, 7)"),
    _cb("calibration-one-batch", lambda c: PruningCallback(fisher(), calibration=text_batch()), TypeError,
        "single batch"),
    _cb("calibration-path", lambda c: PruningCallback(fisher(), calibration="data.jsonl"), TypeError,
        "'data.jsonl'"),
    _cb("calibration-empty", lambda c: PruningCallback(fisher(), calibration=[]), ValueError, "empty"),
    _cb("bias_compensation", lambda c: PruningCallback(magnitude(bias_compensation=True)), ValueError,
        "bias_compensation=True"),
    _cb("recovery-lstsq", lambda c: PruningCallback(magnitude(recovery="lstsq")), ValueError, "recovery='lstsq'"),
    _cb("criterion-needs-calibration", lambda c: PruningCallback(PruningConfig(criterion="fluctuation",
                                                                               macs_ratio=0.5)),
        ValueError, "'fluctuation'"),
    _cb("begin-plain-module", lambda c: _begin(PruningCallback(fisher()), torch.nn.Linear(4, 4)), TypeError,
        "Linear"),
    _cb("begin-budget-removes-everything", lambda c: _begin(PruningCallback(fisher(macs_ratio=1e-9)), c.bert),
        PlanError, "macs_ratio=1e-09"),
    _cb("begin-min_heads-over-budget", lambda c: _begin(PruningCallback(fisher(macs_ratio=0.1, min_heads=4)),
                                                        c.bert), PlanError, "minimum of 4"),
    _cb("begin-calibration-wrong-key", lambda c: _begin(PruningCallback(fisher(), calibration=[{"ids": ids()}]),
                                                        c.bert), ValueError, "['ids']"),
    _cb("begin-calibration-beyond-vocab", lambda c: _begin(
        PruningCallback(fisher(), calibration=[text_batch(input_ids=ids(VOCAB, VOCAB + 1))]), c.gpt2), ValueError,
        f"token id {VOCAB}"),
]


def _sweep(id_, call, error, names):
    return Bad(f"run.sweep-{id_}", call, error, names)


SWEEP = [
    _sweep("ratio-above-one", lambda c: sweep(load_recipe(None), [0.5, 1.5]), ValueError, "1.5"),
    _sweep("ratio-zero", lambda c: sweep(load_recipe(None), [0]), ValueError, "ratio 0"),
    _sweep("ratios-str", lambda c: sweep(load_recipe(None), "0.5"), ValueError, "'0.5'"),
    _sweep("ratios-empty", lambda c: sweep(load_recipe(None), []), ValueError, "ratios=[]"),
    _sweep("ratio-True", lambda c: sweep(load_recipe(None), [True]), ValueError, "True"),
    _sweep("key-head_ratio", lambda c: sweep(load_recipe(None), [0.5], key="head_ratio"),
           ValueError, "'head_ratio'"),
    _sweep("recipe-dict", lambda c: sweep(yaml.safe_load(DEFAULT_RECIPE_YAML), [0.5]), TypeError,
           "dict"),
    _sweep("gradual-recipe", lambda c: sweep(load_recipe(
        {**yaml.safe_load(DEFAULT_RECIPE_YAML), "method": "gradual", "training": {}}), [0.5]), ValueError,
        "method: oneshot"),
    _sweep("key-against-per_layer-scope", lambda c: sweep(load_recipe(
        None, ["--pruning.macs_ratio=null", "--pruning.head_ratio=0.5"]), [0.5]), ValueError, "scope='per_layer'"),
]



def _distill_trainer(ctx, **kwargs):
    from hfprune.distill import DistillationTrainer

    # output_dir inside the watched folder: a check that came after Trainer.__init__ would have created it
    args = T.TrainingArguments(str(ctx.root / "distill-out"), report_to=[], use_cpu=True)
    return DistillationTrainer(model=ctx.bert, args=args, **kwargs)


DISTILL_TRAINER = [
    Bad("DistillationTrainer-config-dict", lambda c: _distill_trainer(c, distill_config={"alpha": 0.5}), TypeError,
        "dict"),
    Bad("DistillationTrainer-config-PruningConfig",
        lambda c: _distill_trainer(c, distill_config=PruningConfig(macs_ratio=0.5)), TypeError, "PruningConfig"),
    Bad("DistillationTrainer-teacher-path", lambda c: _distill_trainer(c, teacher="teacher/dir"), TypeError, "str"),
]

API = CONFIG + SCHEDULE + DISTILL + DISTILL_TRAINER + PRUNE + APPLY + CALLBACK + SWEEP


@pytest.mark.parametrize("bad", API, ids=lambda b: b.id)
def test_api_refuses_bad_input(ctx, bad):
    check_refused(ctx, bad)


@pytest.mark.parametrize("entry", ["run", "sweep", "task", "teacher"])
def test_the_loading_guard_holds_at_every_door(ctx, entry):
    """The guard above is no empty promise: valid input gets as far as loading, and loading is refused, whether
    the run, the sweep, a task object or the fine-tune stage (the cached teacher) would load."""
    raw = {"name": "guard", "model": {"path": str(ctx.root / "ckpt")}, "pruning": {"macs_ratio": 0.5},
           "output": {"dir": str(ctx.root / "guard-out")}}
    recipe = load_recipe(raw)
    calls = {"run": lambda: hfprune.pipeline.run.run(recipe, save=False), "sweep": lambda: sweep(recipe, [0.5]),
             "task": lambda: TASKS[recipe.model.task]().load_model(ctx.root / "ckpt", recipe.model),
             "teacher": lambda: hfprune.pipeline.run.run(load_recipe(None), save=False)}
    disk_before = disk_state(ctx.root)
    with pytest.raises(AssertionError, match="loaded before the input was refused"):
        calls[entry]()
    assert disk_state(ctx.root) == disk_before


# ---- recipes ---------------------------------------------------------------------------------------------------

BASE = yaml.safe_load(DEFAULT_RECIPE_YAML)


def changed(dotted: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


def _recipe(id_, dotted, value, names):
    return Bad(f"recipe-{id_}", lambda c: load_recipe(changed(dotted, value)), RecipeError, names)


def _override(id_, overrides, names):
    return Bad(f"override-{id_}", lambda c: load_recipe(None, overrides), RecipeError, names)


GRADUAL = {"method": "gradual", "training": {"num_train_epochs": 1}}

RECIPES = [
    _recipe("unknown-top-key", "pruning_config", {}, "'pruning_config'"),
    _recipe("unknown-pruning-key", "pruning.macs_ration", 0.5, "pruning.macs_ration"),
    _recipe("name-empty", "name", "", "name=''"),
    _recipe("name-path", "name", "../elsewhere", "name='../elsewhere'"),
    _recipe("name-number", "name", 3, "got 3"),
    _recipe("seed-bool", "seed", True, "got True"),
    _recipe("method-unknown", "method", "cubic", "method='cubic'"),
    _recipe("description-list", "description", ["a"], "got ['a']"),
    _recipe("section-list", "pruning", [0.5], "got [0.5]"),
    _recipe("macs_ratio-word", "pruning.macs_ratio", "half", "got 'half'"),
    _recipe("macs_ratio-bool", "pruning.macs_ratio", True, "got True"),
    _recipe("macs_ratio-above-one", "pruning.macs_ratio", 1.5, "macs_ratio=1.5"),
    _recipe("macs_ratio-inf", "pruning.macs_ratio", float("inf"), "macs_ratio=inf"),
    _recipe("criterion-unknown", "pruning.criterion", "l1", "criterion='l1'"),
    _recipe("criterion-number", "pruning.criterion", 3, "pruning.criterion"),
    _recipe("seq_len-zero", "pruning.seq_len", 0, "seq_len=0"),
    _recipe("model.path-empty", "model.path", "", "path=''"),
    _recipe("model.path-number", "model.path", 7, "model.path"),
    _recipe("model.task-unknown", "model.task", "translation", "model.task='translation'"),
    _recipe("model.num_labels-zero", "model.num_labels", 0, "num_labels=0"),
    _recipe("model.trust_remote_code-str", "model.trust_remote_code", "yes", "got 'yes'"),
    _recipe("data.loader-unknown", "data.loader", "imdb", "loader='imdb'"),
    _recipe("data.loader-half-path", "data.loader", "mypackage.data:", "loader='mypackage.data:'"),
    _recipe("data.files-without-format", "data.loader", "files", "`format`"),
    _recipe("data.max_length-zero", "data.max_length", 0, "max_length=0"),
    _recipe("data.max_eval_samples-zero", "data.max_eval_samples", 0, "max_eval_samples=0"),
    _recipe("data.calibration_samples-float", "data.calibration_samples", 25.5, "got 25.5"),
    _recipe("data.text_column-empty", "data.text_column", "", "text_column=''"),
    _recipe("data.kwargs-list", "data.kwargs", ["a"], "data.kwargs"),
    _recipe("finetune-both", "finetune.teacher", "movie_review", "exactly one of"),
    Bad("recipe-finetune-unknown-teacher", lambda c: load_recipe({**BASE, "finetune": {"teacher": "imdb"}}),
        RecipeError, "teacher='imdb'"),
    _recipe("evaluation.metrics-str", "evaluation.metrics", "accuracy", "got 'accuracy'"),
    _recipe("evaluation.metrics-number", "evaluation.metrics", [3], "metrics=[3]"),
    _recipe("evaluation.batch_size-zero", "evaluation.batch_size", 0, "batch_size=0"),
    _recipe("output.dir-empty", "output.dir", "", "dir=''"),
    _recipe("hub.push-without-repo", "hub.push", True, "repo_id"),
    _recipe("hub.repo_id-spaces", "hub.repo_id", "my model", "repo_id='my model'"),
    Bad("recipe-schedule-on-oneshot", lambda c: load_recipe({**BASE, "schedule": {"kind": "gradual"}}), RecipeError,
        "['schedule']"),
    Bad("recipe-gradual-without-training", lambda c: load_recipe({**BASE, "method": "gradual"}), RecipeError,
        "`training`"),
    Bad("recipe-training-negative-lr", lambda c: load_recipe({**BASE, **GRADUAL, "training": {"learning_rate": -1}}),
        RecipeError, "learning_rate=-1"),
    Bad("recipe-training-output_dir", lambda c: load_recipe({**BASE, **GRADUAL, "training": {"output_dir": "x"}}),
        RecipeError, "training.output_dir"),
    Bad("recipe-training-unknown-key", lambda c: load_recipe({**BASE, **GRADUAL, "training": {"epochs": 1}}),
        RecipeError, "training.epochs"),
    Bad("recipe-schedule-kind", lambda c: load_recipe({**BASE, **GRADUAL, "schedule": {"kind": "cubic"}}),
        RecipeError, "kind='cubic'"),
    Bad("recipe-distillation-alpha", lambda c: load_recipe({**BASE, **GRADUAL, "distillation": {"alpha": 2}}),
        RecipeError, "alpha=2"),
    Bad("recipe-not-a-mapping", lambda c: load_recipe(str(c.root / "list.yaml")), RecipeError, "got list"),
    Bad("recipe-missing-file", lambda c: load_recipe(str(c.root / "missing.yaml")), RecipeError, "missing.yaml"),
    Bad("recipe-directory", lambda c: load_recipe(c.root / "ckpt"), RecipeError, "is a directory"),
    Bad("recipe-broken-yaml", lambda c: load_recipe(c.root / "broken.yaml"), RecipeError, "not valid YAML"),
    Bad("recipe-duplicate-key", lambda c: load_recipe(c.root / "dup.yaml"), RecipeError, "'macs_ratio' appears twice"),
    Bad("recipe-source-int", lambda c: load_recipe(123), RecipeError, "123"),
    _override("without-dashes", ["pruning.macs_ratio=0.3"], "'pruning.macs_ratio=0.3'"),
    _override("without-value", ["--pruning.macs_ratio"], "--pruning.macs_ratio"),
    _override("malformed-key", ["--pruning..x=1"], "'pruning..x'"),
    _override("into-a-scalar", ["--name.x=1"], "name.x"),
    _override("second-budget", ["--pruning.params_ratio=0.5"], "params_ratio"),
    _override("a-string-not-a-list", "--pruning.macs_ratio=0.5", "'--pruning.macs_ratio=0.5'"),
    _override("a-number-in-the-list", [5], "[5]"),
    _override("unclosed-list", ["--pruning.macs_ratio=[0.5"], "'[0.5'"),
    _override("section-to-number", ["--pruning=3"], "got 3"),
]


@pytest.mark.parametrize("bad", RECIPES, ids=lambda b: b.id)
def test_recipe_refuses_bad_input(ctx, bad):
    check_refused(ctx, bad)


# ---- the command line ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadArgs:
    id: str
    argv: Callable  # (root) -> list of arguments
    names: str


CLI = [
    BadArgs("sweep-ratio-above-one", lambda r: ["sweep", "--ratios", "1.5"], "1.5"),
    BadArgs("sweep-ratio-zero", lambda r: ["sweep", "--ratios", "0,0.5"], "got 0.0"),
    BadArgs("sweep-ratio-word", lambda r: ["sweep", "--ratios", "0.5,abc"], "'0.5,abc'"),
    BadArgs("sweep-ratio-none-given", lambda r: ["sweep", "--ratios", ","], "','"),
    BadArgs("sweep-ratio-nan", lambda r: ["sweep", "--ratios", "nan"], "nan"),
    BadArgs("sweep-budget-head_ratio", lambda r: ["sweep", "--ratios", "0.5", "--budget", "head_ratio"],
            "'head_ratio'"),
    BadArgs("sweep-budget-without-value", lambda r: ["sweep", "--budget"], "--budget"),
    BadArgs("sweep-bad-override", lambda r: ["sweep", "--ratios", "0.5", "--pruning.seq_len=-1"], "seq_len=-1"),
    BadArgs("report-out-is-a-file", lambda r: ["report", str(r / "ckpt"), "--out", str(r / "afile.txt")],
            "afile.txt"),
    BadArgs("report-out-below-a-file", lambda r: ["report", str(r / "ckpt"), "--out", str(r / "afile.txt" / "p")],
            "afile.txt"),
    BadArgs("report-missing-dir", lambda r: ["report", str(r / "missing")], "missing"),
    BadArgs("report-dir-is-a-file", lambda r: ["report", str(r / "afile.txt")], "afile.txt"),
    BadArgs("report-no-dir", lambda r: ["report"], "dir"),
    BadArgs("report-unknown-flag", lambda r: ["report", str(r / "ckpt"), "--colour"], "--colour"),
    BadArgs("run-macs_ratio-above-one", lambda r: ["run", "--pruning.macs_ratio=1.5"], "macs_ratio=1.5"),
    BadArgs("run-macs_ratio-bool", lambda r: ["run", "--pruning.macs_ratio=true"], "True"),
    BadArgs("run-macs_ratio-word", lambda r: ["run", "--pruning.macs_ratio=half"], "'half'"),
    BadArgs("run-criterion-unknown", lambda r: ["run", "--pruning.criterion=l1"], "'l1'"),
    BadArgs("run-misspelt-key", lambda r: ["run", "--pruning.macs_ration=0.5"], "macs_ration"),
    BadArgs("run-two-budgets", lambda r: ["run", "--pruning.head_ratio=0.5"], "head_ratio"),
    BadArgs("run-num_labels-zero", lambda r: ["run", "--model.num_labels=0"], "num_labels=0"),
    BadArgs("run-loader-unknown", lambda r: ["run", "--data.loader=mymodule"], "'mymodule'"),
    BadArgs("run-output-dir-empty", lambda r: ["run", "--output.dir=''"], "dir=''"),
    BadArgs("run-push-without-repo", lambda r: ["run", "--hub.push=true"], "repo_id"),
    BadArgs("run-repo_id-spaces", lambda r: ["run", "--hub.repo_id=not a repo"], "'not a repo'"),
    BadArgs("run-method-unknown", lambda r: ["run", "--method=cubic"], "'cubic'"),
    BadArgs("run-seed-bool", lambda r: ["run", "--seed=true"], "True"),
    BadArgs("run-missing-recipe", lambda r: ["run", str(r / "missing.yaml")], "missing.yaml"),
    BadArgs("run-recipe-is-a-directory", lambda r: ["run", str(r / "ckpt")], "is a directory"),
    BadArgs("run-broken-yaml", lambda r: ["run", str(r / "broken.yaml")], "not valid YAML"),
    BadArgs("run-duplicate-key", lambda r: ["run", str(r / "dup.yaml")], "'macs_ratio' appears twice"),
    BadArgs("run-override-without-value", lambda r: ["run", "--pruning.macs_ratio"], "--pruning.macs_ratio"),
    BadArgs("run-two-recipes", lambda r: ["run", "a.yaml", "b.yaml"], "'b.yaml'"),
    BadArgs("prune-no-budget", lambda r: ["prune", "--model_dir", str(r / "ckpt"), "--output_dir", str(r / "p")],
            "exactly one budget"),
    BadArgs("prune-macs_ratio-above-one", lambda r: ["prune", "--model_dir", str(r / "ckpt"), "--output_dir",
                                                     str(r / "p"), "--macs_ratio", "1.5"], "macs_ratio=1.5"),
    BadArgs("prune-criterion-unknown", lambda r: ["prune", "--model_dir", str(r / "ckpt"), "--output_dir",
                                                  str(r / "p"), "--criterion", "l1", "--macs_ratio", "0.5"], "'l1'"),
    BadArgs("prune-missing-model", lambda r: ["prune", "--model_dir", str(r / "missing"), "--output_dir",
                                              str(r / "p"), "--criterion", "magnitude", "--macs_ratio", "0.5"],
            "missing"),
    BadArgs("env-with-arguments", lambda r: ["env", "x"], "['x']"),
    BadArgs("unknown-command", lambda r: ["frobnicate"], "'frobnicate'"),
]


@pytest.mark.parametrize("bad", CLI, ids=lambda b: b.id)
def test_cli_refuses_bad_input_in_one_line(ctx, bad, capsys, monkeypatch):
    monkeypatch.chdir(ctx.root)  # relative outputs (outputs/<name>) would land in the watched folder
    models_before = {name: model_state(m) for name, m in ctx.models.items()}
    disk_before = disk_state(ctx.root)
    capsys.readouterr()
    assert main(bad.argv(ctx.root)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("hfprune") and "error" in err, captured.err
    assert bad.names in err, f"the message does not name {bad.names!r}: {err}"
    assert "Traceback" not in captured.err and captured.out == ""
    assert_untouched(ctx, models_before, disk_before)


# ---- the fixes the messages suggest work, and the table is what it claims ----------------------------------------


def test_a_trainer_with_an_unreachable_budget_stops_before_its_first_step(ctx):
    out = ctx.root / "trainer-out"
    data = [{"input_ids": ids()[0], "attention_mask": torch.ones(7, dtype=torch.long), "labels": torch.tensor(1)}
            for _ in range(4)]
    args = T.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, save_steps=1,
                               report_to=[], use_cpu=True)
    callback = PruningCallback(magnitude(macs_ratio=1e-9))
    trainer = T.Trainer(model=ctx.bert, args=args, train_dataset=data, callbacks=[callback])
    models_before = {name: model_state(m) for name, m in ctx.models.items()}
    disk_before = disk_state(ctx.root)
    with pytest.raises(PlanError, match="macs_ratio=1e-09"):
        trainer.train()
    assert trainer.state.global_step == 0 and callback.masks is None
    assert_untouched(ctx, models_before, disk_before)


class CountedBatches:
    """Re-iterable batches (like a DataLoader) that count the batches read from them."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.read += 1
            yield batch


def test_an_unreachable_budget_is_refused_before_the_scoring_pass(ctx):
    data = CountedBatches([text_batch(), text_batch()])
    with pytest.raises(PlanError, match="minimum of 4"):
        hfprune.prune(ctx.bert, data, fisher(macs_ratio=0.1, min_heads=4))
    assert data.read == 1  # the check read the first batch; no scoring pass began


def test_allow_empty_accepts_a_budget_that_removes_everything():
    model = CASES["bert"].build("eager")
    result = hfprune.prune(model, None, magnitude(macs_ratio=1e-9, allow_empty=True))
    assert all(layer.get("heads") == () and layer.get("ffn") == () for layer in result.plan.layers)


def test_tokenizer_tokenises_an_untokenised_dataset():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "a", "film", "bore", "fine"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    data = dataset(text=["a film", "a bore", "a fine film"], label=[1, 0, 1])
    result = hfprune.prune(CASES["bert"].build("eager"), data, fisher(calibration_batch_size=2), tokenizer=tokenizer)
    assert result.after.macs <= 0.5 * result.before.macs


def test_the_tables_are_large_and_distinct():
    ids_ = [b.id for b in API + RECIPES + CLI]
    assert len(ids_) == len(set(ids_))
    assert len(ids_) >= 150

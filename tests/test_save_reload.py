"""Pruned checkpoints reload without hfprune, to the outputs the pruned model had, and broken ones fail loudly.

Every case in ``CASES`` is pruned heterogeneously (remote-code checkpoint) and uniformly (plain checkpoint where
the family's config can state the widths), saved, and reloaded in ONE fresh ``python -I`` child process in which
``import hfprune`` fails: starting Python and transformers costs seconds, so the module-scoped fixture prepares
every checkpoint first and the child works through all of them. Inputs go to the child and outputs come back as
safetensors files; the tests then compare per case.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import hfprune
from hfprune.core.apply import model_dims
from hfprune.core.checkpoint import save as save_module
from hfprune.core.checkpoint import transaction
from hfprune.core.checkpoint.classes import original_class

from .cases import CASES, random_plan

ATOL = 1e-5
SEED = 0
NEW_TOKENS = 6

# ----------------------------------------------------------------------------------------------
# The child: no hfprune, no tests package; it reads a manifest of jobs and writes results.json.

CHILD = r'''
import importlib.abc, importlib.util, json, sys, traceback

found = importlib.util.find_spec("hfprune") is not None  # only reported: the blocker below decides


class _NoHfprune(importlib.abc.MetaPathFinder):  # hfprune may be pip-installed; this process must not see it
    def find_spec(self, name, path=None, target=None):
        if name == "hfprune" or name.startswith("hfprune."):
            raise ImportError(f"{name} is not importable in this reload test")
        return None


sys.meta_path.insert(0, _NoHfprune())
try:
    import hfprune  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

import torch
import transformers
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in leaves(o)]
    return []  # caches and other non-tensors


def outputs(model, job):
    tensors = load_file(job["inputs"])
    lists = job["extra_inputs"]["lists"]
    kwargs = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in lists}
    kwargs.update({name: [tensors[f"{name}.{i}"] for i in range(n)] for name, n in lists.items()})
    kwargs.update(job["extra_inputs"]["values"])
    torch.manual_seed(1234)  # models that sample inside forward draw the same numbers as in the parent
    with torch.no_grad():
        tensors = {f"out.{i}": t.detach().contiguous() for i, t in enumerate(leaves(model(**kwargs)))}
        if job["generate"]:
            ids = kwargs["input_ids"][:1]
            tensors["generated"] = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=job["generate"], use_cache=True)
    return tensors


def load(job, directory):
    kwargs = {"trust_remote_code": True} if job["trust_remote_code"] else {}
    if job["attn_implementation"]:
        kwargs["attn_implementation"] = job["attn_implementation"]
    return getattr(transformers, job["loader"]).from_pretrained(directory, **kwargs)


manifest = json.load(open(sys.argv[1]))
results = {"_child": {"hfprune_blocked": blocked, "hfprune_found": found,
                      "hfprune_in_modules": False, "transformers": transformers.__version__}}
for job in manifest["jobs"]:
    res = results[job["name"]] = {"ok": False}
    try:
        model = load(job, job["dir"]).eval()
        res["class"] = type(model).__name__
        res["module"] = type(model).__module__
        save_file(outputs(model, job), job["outputs"])
        if job.get("resave"):
            model.save_pretrained(job["resave"])
            again = load(job, job["resave"]).eval()
            res["resaved_class"] = type(again).__name__
            save_file(outputs(again, job), job["resave_outputs"])
        res["ok"] = True
    except Exception as err:
        res["error_type"] = type(err).__name__
        res["error"] = str(err)
        res["traceback"] = traceback.format_exc()[-3000:]
    results["_child"]["hfprune_in_modules"] = any(m == "hfprune" or m.startswith("hfprune.") for m in sys.modules)
    json.dump(results, open(manifest["results"], "w"), indent=1)
'''


@dataclass
class Job:
    name: str
    model_type: str
    directory: Path
    loader: str  # a transformers class name: an AutoModelFor* class, or the model class where none maps it
    trust_remote_code: bool
    attn_implementation: str | None = None
    expected: list = field(default_factory=list)  # output tensors of the pruned model in this process
    generated: torch.Tensor | None = None
    resave: bool = False
    info: dict = field(default_factory=dict)


def _leaves(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []


def _encode_inputs(inputs: dict) -> tuple:
    """Forward kwargs as safetensors (tensors; lists of tensors as ``name.0``, ``name.1``...) plus JSON (the rest)."""
    tensors, extra = {}, {"lists": {}, "values": {}}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.contiguous()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            extra["lists"][name] = len(value)
            tensors.update({f"{name}.{i}": v.contiguous() for i, v in enumerate(value)})
        else:
            extra["values"][name] = value
    return tensors, json.loads(json.dumps(extra))


def _loader(model_type: str, class_name: str, auto_map: dict | None = None) -> str:
    """The auto class to reload with (the one auto_map or transformers maps the class to), else the class."""
    if auto_map:
        autos = sorted(a for a, v in auto_map.items() if v.endswith(f".{class_name}"))
    else:
        autos = save_module.auto_classes_for(model_type, class_name)
    specific = [a for a in autos if a not in ("AutoModel", "AutoModelForPreTraining")]
    return (specific or autos or [class_name])[0]


def _prepare(root: Path, job: Job, model, case, inputs: dict, generate: bool) -> dict:
    """Save ``inputs`` for the child, compute the in-process outputs, return the child's job entry."""
    work = root / "io" / job.name
    work.mkdir(parents=True)
    tensors, extra = _encode_inputs(inputs)
    save_file(tensors, work / "inputs.safetensors")
    job.info.update(inputs=inputs, plan=getattr(model, "hfprune_plan", None))  # for the in-process loads
    model.eval()
    torch.manual_seed(1234)
    with torch.no_grad():
        job.expected = [t.detach().clone() for t in _leaves(model(**inputs))]
        if generate:
            ids = inputs["input_ids"][:1]
            job.generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                           do_sample=False, use_cache=False)
    entry = {
        "name": job.name, "dir": str(job.directory), "loader": job.loader,
        "trust_remote_code": job.trust_remote_code, "attn_implementation": job.attn_implementation,
        "inputs": str(work / "inputs.safetensors"), "extra_inputs": extra,
        "outputs": str(work / "outputs.safetensors"), "generate": NEW_TOKENS if generate else 0,
    }
    if job.resave:
        entry["resave"] = str(root / "resaved" / job.name)
        entry["resave_outputs"] = str(work / "resaved_outputs.safetensors")
    return entry


def _build(model_type: str, seed: int = SEED):
    case = CASES[model_type]
    attn = case.attn_implementations[0]
    torch.manual_seed(seed)
    return case, attn, case.build(attn).eval()


# -- plans --------------------------------------------------------------------------------------


def uniform_plan(model, seed: int, gqa: str = "groups") -> dict:
    """A plan the vanilla config can state: every width the family's config names is kept at the same size in
    every layer (different indices per layer), and the last layer is dropped where the stack allows it.

    ``gqa="groups"`` keeps whole key/value groups; ``"per_group"`` keeps one query head in every group.
    """
    rng = random.Random(seed)
    adapter = hfprune.get_adapter(model)
    spec = adapter.arch_spec(model.config)
    plan = {}
    for key, layers in model_dims(model).items():
        fields = adapter.fields.get(key)
        stack = spec.stacks[key]
        entries = []
        for i, blocks in enumerate(layers):
            if stack.droppable and len(layers) > 2 and i == len(layers) - 1:
                entries.append({"drop": True})
                continue
            entry = {}
            for name, size in blocks.items():
                if name == "heads" and fields is not None and fields.heads is not None:
                    heads, kv_heads = size
                    group = heads // kv_heads
                    if group == 1:
                        entry[name] = sorted(rng.sample(range(heads), max(1, heads // 2)))
                    elif gqa == "groups":
                        groups = sorted(rng.sample(range(kv_heads), max(1, kv_heads // 2)))
                        entry[name] = [g * group + h for g in groups for h in range(group)]
                    else:
                        entry[name] = [g * group + rng.randrange(group) for g in range(kv_heads)]
                elif fields is not None and name in fields.ffn:
                    entry[name] = sorted(rng.sample(range(size[0]), size[0] // 2 + 1))
            entries.append(entry)
        plan[key] = entries
    return plan


def _gqa(model_type: str) -> bool:
    try:
        dims = model_dims(_build(model_type)[2])
    except Exception:  # a broken case fails in its own test, not at collection
        return False
    return any(b["heads"][0] != b["heads"][1] for layers in dims.values() for b in layers if "heads" in b)


PLAIN = [(t, v) for t in sorted(CASES) for v in (("groups", "per_group") if _gqa(t) else ("groups",))]

# Tampered copies of one heterogeneous checkpoint per family: plan edits that disagree with the tensors.
TAMPER_PLANS = {
    "llama": {"layers": [{"heads": [0, 1], "ffn": list(range(20))}, {"heads": [0, 2], "ffn": list(range(5, 30))},
                         {"drop": True}]},
    "bert": {"layers": [{"heads": [0, 2], "ffn": list(range(20))}, {"heads": [1, 2, 3], "ffn": list(range(5, 30))},
                        {"drop": True}]},
}


def _tamper_fewer_heads(config):  # layer 1 loses a kept query head (and with it a key/value group)
    config["hfprune"]["plan"]["layers"][1]["heads"] = [0]


def _tamper_emptied_heads(config):  # layer 0 becomes an EmptyAttention: its q/k/v/o tensors have no home
    config["hfprune"]["plan"]["layers"][0]["heads"] = []


def _tamper_fewer_neurons(config):
    config["hfprune"]["plan"]["layers"][0]["ffn"] = config["hfprune"]["plan"]["layers"][0]["ffn"][:-1]


def _tamper_undropped(config):  # the dropped layer is back in the plan, not in num_hidden_layers
    config["hfprune"]["plan"]["layers"][2] = {}


def _tamper_no_record(config):
    del config["hfprune"]


TAMPERS = {
    # name: (model_type, edit, strings the error must contain)
    "llama-fewer-heads": ("llama", _tamper_fewer_heads,
                          ["model.layers.1.self_attn.q_proj.weight", "[16, 32]", "[8, 32]", "size mismatch"]),
    "llama-emptied-heads": ("llama", _tamper_emptied_heads,
                            ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.bias"]),
    "llama-undropped": ("llama", _tamper_undropped, ["keeps 3 layers", "builds 2"]),
    "llama-no-record": ("llama", _tamper_no_record, ["config.hfprune"]),
    "bert-fewer-neurons": ("bert", _tamper_fewer_neurons,
                           ["bert.encoder.layer.0.intermediate.dense.weight", "[20, 32]", "[19, 32]"]),
}


# -- the fixture ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Build, prune and save every checkpoint, reload them all in one child without hfprune; per-job results."""
    root = tmp_path_factory.mktemp("reload")
    jobs, entries, failed = {}, [], {}

    def add(job: Job, make):
        try:
            entry = make(job)
        except Exception as err:  # reported by the job's own test, not by every test of the module
            failed[job.name] = err
            return
        jobs[job.name] = job
        entries.append(entry)

    for model_type in sorted(CASES):
        def hetero(job, model_type=model_type):
            case, attn, dense = _build(model_type)
            model = hfprune.apply_plan(copy.deepcopy(dense), random_plan(dense, SEED))
            assert model.hfprune_heterogeneous, "random_plan should need remote code"
            model.save_pretrained(job.directory)
            config = json.loads((job.directory / "config.json").read_text())
            job.loader = _loader(model_type, original_class(model).__name__, config.get("auto_map"))
            job.attn_implementation = attn
            job.info["class"] = original_class(model).__name__
            return _prepare(root, job, model, case, case.inputs(SEED), case.generate)

        add(Job(f"hetero-{model_type}", model_type, root / "hetero" / model_type, "", True, resave=True), hetero)

    for model_type, variant in PLAIN:
        def plain(job, model_type=model_type, variant=variant):
            case, attn, dense = _build(model_type)
            model = hfprune.apply_plan(copy.deepcopy(dense), uniform_plan(dense, SEED, variant))
            assert not model.hfprune_heterogeneous, "a uniform plan should give a plain checkpoint"
            model.save_pretrained(job.directory)
            job.loader = _loader(model_type, original_class(model).__name__)
            job.attn_implementation = attn
            job.info.update(cls=original_class(model).__name__, dims=model_dims(model),
                            dense_numel=sum(p.numel() for p in dense.parameters()),
                            numel=sum(p.numel() for p in model.parameters()))
            return _prepare(root, job, model, case, case.inputs(SEED), case.generate)

        add(Job(f"plain-{model_type}-{variant}", model_type, root / "plain" / f"{model_type}-{variant}", "", False),
            plain)

    sources = {}
    for name, (model_type, edit, _) in TAMPERS.items():
        def tampered(job, model_type=model_type, edit=edit):
            case, attn, dense = _build(model_type)
            if model_type not in sources:
                model = hfprune.apply_plan(copy.deepcopy(dense), TAMPER_PLANS[model_type])
                assert model.hfprune_heterogeneous
                sources[model_type] = (model, root / "tamper-source" / model_type)
                model.save_pretrained(sources[model_type][1])
            model, source = sources[model_type]
            shutil.copytree(source, job.directory)
            config = json.loads((job.directory / "config.json").read_text())
            edit(config)
            (job.directory / "config.json").write_text(json.dumps(config))
            job.loader = _loader(model_type, original_class(model).__name__,
                                 json.loads((source / "config.json").read_text())["auto_map"])
            job.attn_implementation = attn
            return _prepare(root, job, model, case, case.inputs(SEED), False)

        add(Job(f"tamper-{name}", model_type, root / "tamper" / name, "", True), tampered)

    # A heterogeneous checkpoint loaded without trust_remote_code: transformers picks the stock class.
    def no_trust(job):
        case, attn, _ = _build("llama")
        model, source = sources["llama"]
        job.directory = source
        job.loader, job.attn_implementation = "AutoModelForCausalLM", attn
        return _prepare(root, job, model, case, case.inputs(SEED), False)

    add(Job("no-trust-llama", "llama", root, "", False), no_trust)

    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"jobs": entries, "results": str(root / "results.json")}, indent=1))
    (root / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-I", str(root / "child.py"), str(manifest)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    return {"root": root, "jobs": jobs, "failed": failed, "results": results, "proc": proc}


def _result(reloaded, name: str) -> tuple:
    if name in reloaded["failed"]:
        raise reloaded["failed"][name]
    proc = reloaded["proc"]
    assert name in reloaded["results"], f"child exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    child = reloaded["results"]["_child"]
    assert child["hfprune_blocked"] and not child["hfprune_in_modules"], child
    return reloaded["jobs"][name], reloaded["results"][name]


def _assert_same(expected: list, path: Path, prefix: str = "out.") -> None:
    got = load_file(path)
    outs = [got[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in got))]
    assert len(outs) == len(expected) > 0
    for i, (x, y) in enumerate(zip(outs, expected)):
        assert x.shape == y.shape and x.dtype == y.dtype, (i, x.shape, y.shape)
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        assert diff <= ATOL, f"output {i}: max abs diff {diff:.3g} > {ATOL}"


def _io(reloaded, name: str) -> Path:
    return reloaded["root"] / "io" / name


# -- heterogeneous checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_heterogeneous_checkpoint_reloads_without_hfprune(reloaded, model_type):
    job, res = _result(reloaded, f"hetero-{model_type}")
    files = sorted(p.name for p in job.directory.iterdir())
    assert save_module.MODELING_FILE in files and save_module.PLAN_FILE in files, files
    config = json.loads((job.directory / "config.json").read_text())
    assert "hfprune" in config and config["architectures"] == [job.info["class"]]
    assert config["auto_map"][job.loader] == f"modeling_hfprune.{job.info['class']}"
    assert res["ok"], res.get("traceback")
    # the checkpoint's own class, named like the transformers class it prunes (pipeline() checks the name)
    assert res["class"] == job.info["class"] and res["module"].startswith("transformers_modules.")
    _assert_same(job.expected, _io(reloaded, job.name) / "outputs.safetensors")
    if job.generated is not None:
        assert torch.equal(load_file(_io(reloaded, job.name) / "outputs.safetensors")["generated"], job.generated)


def test_modeling_file_imports_only_torch_and_transformers(reloaded):
    job, _ = _result(reloaded, "hetero-llama")
    siblings = {name[:-3] for name in save_module.CODE_FILES}
    for name in save_module.CODE_FILES:  # the modeling file and the engine files it imports
        tree = ast.parse((job.directory / name).read_text())
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        relative = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level}
        imports = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imports |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and not n.level}
        # safetensors is a dependency transformers itself requires, so it is present wherever transformers is
        assert imports and imports - set(sys.stdlib_module_names) <= {"torch", "transformers", "safetensors"}, imports
        assert relative <= siblings - {name[:-3]}, (name, relative)
    assert "from .modeling_hfprune_slicing import" in (job.directory / save_module.MODELING_FILE).read_text()


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_reloaded_checkpoint_saves_again(reloaded, model_type):
    job, res = _result(reloaded, f"hetero-{model_type}")
    assert res["ok"], res.get("traceback")
    assert res["resaved_class"] == res["class"]
    resaved = reloaded["root"] / "resaved" / job.name
    for code in save_module.CODE_FILES:  # transformers copies the modeling file and what it imports relatively
        assert (resaved / code).read_bytes() == (job.directory / code).read_bytes(), code
    config, original = (json.loads((d / "config.json").read_text()) for d in (resaved, job.directory))
    assert config["hfprune"] == original["hfprune"] and config["auto_map"] == original["auto_map"]
    assert config["architectures"] == original["architectures"] == [job.info["class"]]
    # transformers' save, with the checkpoint's code and no hfprune, keeps the plan file: plan, dense sizes, version
    plan = save_module.PLAN_FILE
    assert json.loads((resaved / plan).read_text()) == json.loads((job.directory / plan).read_text())
    _assert_same(job.expected, _io(reloaded, job.name) / "resaved_outputs.safetensors")
    if job.generated is not None:
        assert torch.equal(load_file(_io(reloaded, job.name) / "resaved_outputs.safetensors")["generated"],
                           job.generated)


# -- plain checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,variant", PLAIN)
def test_uniform_plan_saves_a_plain_checkpoint(reloaded, model_type, variant):
    job, res = _result(reloaded, f"plain-{model_type}-{variant}")
    assert job.info["numel"] < job.info["dense_numel"]
    files = sorted(p.name for p in job.directory.iterdir())
    assert save_module.MODELING_FILE not in files, files
    config = json.loads((job.directory / "config.json").read_text())
    assert "auto_map" not in config and "hfprune" not in config
    assert config["architectures"] == [job.info["cls"]]
    # the config states the pruned widths
    fields = hfprune.get_adapter(_build(model_type)[2]).fields
    for key, layers in job.info["dims"].items():
        stack_fields = fields.get(key)
        if stack_fields is None:
            continue
        if stack_fields.heads is not None and "heads" in layers[0]:
            assert config[stack_fields.heads] == layers[0]["heads"][0]
            if stack_fields.kv_heads is not None:
                assert config[stack_fields.kv_heads] == layers[0]["heads"][1]
        for block, name in stack_fields.ffn.items():
            if block in layers[0]:
                assert config[name] == layers[0][block][0]
    assert res["ok"], res.get("traceback")
    assert res["class"] == job.info["cls"] and res["module"].startswith("transformers.models."), res
    _assert_same(job.expected, _io(reloaded, job.name) / "outputs.safetensors")
    if job.generated is not None:  # generation with a KV cache in the reloaded model
        assert torch.equal(load_file(_io(reloaded, job.name) / "outputs.safetensors")["generated"], job.generated)


# -- hfprune.from_pretrained: the same checkpoints, in this process, with no code from them ----------------------

HFPRUNE_LOADS = [f"hetero-{t}" for t in sorted(CASES)] + [f"plain-{t}-{v}" for t, v in PLAIN]


@pytest.mark.parametrize("name", HFPRUNE_LOADS)
def test_hfprune_from_pretrained_gives_the_pruned_outputs(reloaded, name, monkeypatch):
    if name in reloaded["failed"]:
        raise reloaded["failed"][name]
    job = reloaded["jobs"][name]

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: the checkpoint's code was imported")

    monkeypatch.setattr(T.dynamic_module_utils, "get_class_from_dynamic_module", refuse)
    kwargs = {"attn_implementation": job.attn_implementation} if job.attn_implementation else {}
    inputs = job.info["inputs"]
    # the class config.json names, and the class the child loaded with (an auto class, resolved by hfprune)
    for model_class in (None, getattr(T, job.loader)):
        model = hfprune.from_pretrained(job.directory, model_class=model_class, **kwargs).eval()
        assert original_class(model).__name__ == job.info.get("class", job.info.get("cls"))
        assert model.hfprune_plan == job.info["plan"] and model.hfprune_plan.dense == job.info["plan"].dense
        assert model.hfprune_heterogeneous == name.startswith("hetero-")
        torch.manual_seed(1234)
        with torch.no_grad():
            outs = _leaves(model(**inputs))
            assert len(outs) == len(job.expected) > 0
            for i, (x, y) in enumerate(zip(outs, job.expected)):
                assert x.shape == y.shape and x.dtype == y.dtype, (i, x.shape, y.shape)
                diff = (x - y).abs().max().item() if x.numel() else 0.0
                assert diff <= ATOL, f"{name} output {i}: max abs diff {diff:.3g} > {ATOL}"
            if job.generated is not None:  # with a KV cache, as in the child
                ids = inputs["input_ids"][:1]
                generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=NEW_TOKENS, use_cache=True)
                assert torch.equal(generated, job.generated)


def test_plain_llama_keeps_gqa_shapes(reloaded):
    for variant, heads, kv_heads in (("groups", 2, 1), ("per_group", 2, 2)):
        job, res = _result(reloaded, f"plain-llama-{variant}")
        config = json.loads((job.directory / "config.json").read_text())
        shape = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
        assert shape == (heads, kv_heads, 8)
        assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 37 // 2 + 1
        assert len(config.get("layer_types") or [0, 0]) == 2
        assert res["ok"], res.get("traceback")


# -- inconsistent checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_plan_fails_clearly(reloaded, name):
    job, res = _result(reloaded, f"tamper-{name}")
    assert not res["ok"], f"{name}: a checkpoint whose plan disagrees with its tensors loaded"
    assert res["error_type"] == "ValueError", res.get("traceback")
    for needle in TAMPERS[name][2]:
        assert needle in res["error"], (needle, res["error"])


def test_heterogeneous_checkpoint_without_trust_remote_code_fails(reloaded):
    # transformers falls back to the stock class, whose widths disagree with the tensors: it must not load.
    # (transformers raises a RuntimeError that points at its logged load report.)
    _, res = _result(reloaded, "no-trust-llama")
    assert not res["ok"], "a heterogeneous checkpoint loaded into the stock class"
    assert res["error_type"] in ("RuntimeError", "ValueError") and "mismatch" in res["error"], res


# -- atomic save -----------------------------------------------------------------------------------


def _bert(plan):
    torch.manual_seed(0)
    dense = CASES["bert"].build("eager")
    return hfprune.apply_plan(dense, plan)


HETERO = {"layers": [{"heads": [0, 1]}, {"heads": [3], "ffn": [1, 2]}, {"drop": True}]}
UNIFORM = {"layers": [{"ffn": [0, 1, 2]}, {"ffn": [4, 5, 6]}, {"drop": True}]}


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fail_mid_save(monkeypatch):
    """Make transformers' save write part of the checkpoint, then fail."""
    real = T.PreTrainedModel.save_pretrained

    def broken(self, save_directory, *args, **kwargs):
        real(self, save_directory, *args, **kwargs)
        Path(save_directory, "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", broken)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _bert(HETERO)
    _fail_mid_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(save_module, "write_modeling_file", _raise)
    with pytest.raises(RuntimeError, match="boom"):
        model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _raise(*args, **kwargs):
    raise RuntimeError("boom")


def test_failed_save_over_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    _bert(HETERO).save_pretrained(target)
    before = _snapshot(target)
    replacement = _bert(UNIFORM)
    assert not replacement.hfprune_heterogeneous

    _fail_mid_save(monkeypatch)
    with pytest.raises(OSError):
        replacement.save_pretrained(target)
    assert _snapshot(target) == before and sorted(tmp_path.iterdir()) == [target]
    monkeypatch.undo()

    # failing at the last step before the save counts, writing its commit marker, keeps the old checkpoint too
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == transaction.MARKER:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(transaction.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        replacement.save_pretrained(target)
    monkeypatch.undo()
    assert _snapshot(target) == before and sorted(tmp_path.iterdir()) == [target]

    # failing after it, while the files move in, is finished by the next recovery: the new checkpoint, whole
    moves = []

    def replace_after_commit(src, dst):
        if Path(src).parent.name.startswith(transaction.STAGING_PREFIX) and Path(dst).name != transaction.MARKER:
            moves.append(dst)
            if len(moves) == 2:
                raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(transaction.os, "replace", replace_after_commit)
    with pytest.raises(OSError, match="rename failed"):
        replacement.save_pretrained(target)
    monkeypatch.undo()
    transaction.recover(target)
    replacement.save_pretrained(tmp_path / "fresh")
    fresh = _snapshot(tmp_path / "fresh")
    shutil.rmtree(tmp_path / "fresh")

    # the new checkpoint replaces the old one as a whole: no file of the old one survives (its remote code too)
    assert sorted(tmp_path.iterdir()) == [target]
    files = _snapshot(target)
    assert files == fresh
    assert save_module.MODELING_FILE not in files
    config = json.loads(files["config.json"])
    assert "hfprune" not in config and "auto_map" not in config and config["intermediate_size"] == 3
    # and a successful save over it in one go gives the same files
    _bert(HETERO).save_pretrained(target)
    replacement.save_pretrained(target)
    assert _snapshot(target) == fresh
    reloaded = T.BertForSequenceClassification.from_pretrained(target)
    for name, tensor in replacement.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

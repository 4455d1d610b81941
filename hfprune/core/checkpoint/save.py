# Copyright hfprune contributors. Apache-2.0.
"""Saving of pruned models, with generated self-contained modeling code where it is needed. Saves go through
``transaction``: the files already in the target folder stay.

A plan the vanilla config can express saves as a plain checkpoint. Any other plan saves with
``modeling_hfprune.py`` (the structure engine plus one subclass per auto class) and an ``auto_map``, so
``AutoModelForX.from_pretrained(dir, trust_remote_code=True)`` rebuilds it without hfprune installed.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import transformers
from torch import nn

from ...version import __version__
from .. import structure
from .classes import HfprunedModel, original_class
from .per_layer import set_per_layer_config
from .transaction import Transaction

MODELING_FILE = structure.MODELING_FILE
PLAN_FILE = structure.PLAN_FILE
CODE_FILES = (MODELING_FILE, *structure.ENGINE_FILES.values())  # what a checkpoint with remote code carries


def save_pruned(model: nn.Module, save_directory, *args, **kwargs) -> None:
    """Save like ``save_pretrained``, through a :class:`~hfprune.core.checkpoint.transaction.Transaction`: the folder's
    other files stay, a failure leaves the previous checkpoint as it was, a kill is recovered by the next save.

    ``push_to_hub=True`` then uploads the files this save wrote (see :func:`~hfprune.core.checkpoint.hub.push_saved`),
    with transformers' Hub arguments: ``repo_id`` (default: the folder's name), ``private``, ``token``,
    ``commit_message``, ``commit_description``, ``create_pr``, ``revision``, ``tags``.
    """
    base = original_class(model)
    save, hub = structure.split_save_arguments(base.save_pretrained.__get__(model, base), save_directory, *args,
                                               **kwargs)
    directory = save.pop("save_directory")
    # Built (and the path checked) on every process, so a bad path fails on all ranks rather than hanging the others.
    txn = Transaction(directory, weights=weight_names(model, save.get("variant")))
    if not save.get("is_main_process", True):
        return  # only the main process writes (and pushes); the others have nothing to add
    with txn:
        stage_checkpoint(model, txn, **save)
    if hub is not None:
        from .hub import push_saved

        push_saved(model, txn, **hub)


def stage_checkpoint(model: nn.Module, txn: Transaction, *args, **kwargs) -> None:
    """Write ``model``'s checkpoint into the staging folder of the open transaction ``txn`` and declare the files of
    an earlier save it supersedes. A model hfprune did not prune saves as transformers saves it."""
    staging = txn.staging
    if not isinstance(model, HfprunedModel):
        model.save_pretrained(staging, *args, **kwargs)
        return
    base = original_class(model)
    base.save_pretrained(model, staging, *args, **kwargs)
    _finish(model, base, staging)
    txn.superseded += superseded_code(txn.target, staging)


def weight_names(model: nn.Module, variant: str | None = None) -> tuple:
    """``(single file, index)`` names ``save_pretrained`` gives ``model``'s weights, as transformers 5 names them."""
    adapters = getattr(model, "_hf_peft_config_loaded", False)
    return (_add_variant("adapter_model.safetensors" if adapters else "model.safetensors", variant),
            _add_variant("model.safetensors.index.json", variant))


def _add_variant(name: str, variant: str | None) -> str:
    # transformers.modeling_utils._add_variant, which is private: the variant goes before the last extension.
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def superseded_code(target: Path, staging: Path) -> list:
    """The code files of the checkpoint in ``target`` (:data:`CODE_FILES` there) when it was an hfprune save with
    remote code (its config's ``auto_map`` names our modeling file) and the new one in ``staging`` has none; stale
    code beside a plain checkpoint would be pushed and read as part of it. An engine file is listed only if hfprune
    wrote it (its first line is ours)."""
    if (staging / MODELING_FILE).exists() or not (target / MODELING_FILE).is_file():
        return []
    try:
        auto_map = json.loads((target / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    ours = f"{MODELING_FILE[:-3]}."
    refs = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value])]
    if not any(isinstance(v, str) and v.startswith(ours) for v in refs):
        return []
    return [MODELING_FILE] + [name for name in structure.ENGINE_FILES.values() if _written_by_us(target / name)]


def engine_source(package_name: str) -> str:
    """The source of the engine file ``package_name`` (a key of ``structure.ENGINE_FILES``) as a checkpoint
    carries it."""
    module = importlib.import_module(f"{structure.__package__}.{package_name[:-3]}")
    return structure.checkpoint_source(inspect.getsource(module))


def _written_by_us(path: Path) -> bool:
    # hfprune's engine files all start with the same copyright line; a user's file of that name would not
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline() == inspect.getsource(structure).splitlines(keepends=True)[0]
    except (OSError, UnicodeDecodeError):
        return False


def _finish(model: nn.Module, base: type, directory: Path) -> None:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [base.__name__]
    if model.hfprune_heterogeneous:
        from ..plan import PrunePlan

        record = config.get(structure.HFPRUNE_CONFIG_KEY) or {}
        # The record is what the weights are rebuilt with; prune_plan.json must say the same (the loader refuses
        # a checkpoint where they differ), and it gains the dense sizes a record from an older hfprune lacks.
        if PrunePlan.from_dict(record.get("plan") or {"layers": []}).stacks() != model.hfprune_plan.stacks():
            raise ValueError("the model's hfprune_plan and its config's hfprune record disagree; re-apply the plan "
                             "with hfprune.apply_plan before saving")
        record["plan"] = model.hfprune_plan.to_dict()
        config["auto_map"] = write_modeling_file(model, base, directory)
    else:
        config.pop(structure.HFPRUNE_CONFIG_KEY, None)
        # a model loaded from a heterogeneous checkpoint's code and pruned to a plain one: no code to point at
        auto_map = {k: v for k, v in (config.get("auto_map") or {}).items() if MODELING_FILE[:-3] not in str(v)}
        if auto_map:
            config["auto_map"] = auto_map
        else:
            config.pop("auto_map", None)
    set_per_layer_config(model, config, model.hfprune_heterogeneous)  # transformers' per_layer_config (Llama family)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    text = structure.plan_file_text(model.hfprune_plan.to_dict(), config.get("model_type"), __version__)
    (directory / PLAN_FILE).write_text(text)


def write_modeling_file(model: nn.Module, base: type, directory: Path) -> dict:
    """Write ``modeling_hfprune.py`` and return the ``auto_map`` that points at its classes."""
    classes = {base.__name__: base}
    if model.base_model is not model:
        base_model_cls = original_class(model.base_model)
        classes[base_model_cls.__name__] = base_model_cls
    lines = [
        structure.checkpoint_source(inspect.getsource(structure)).rstrip(),
        "",
        "",
        f"# ---- Generated by hfprune {__version__}: the classes this checkpoint's auto_map names. ----",
        "# Each keeps the name of the transformers class it prunes: transformers identifies models by class name",
        "# (pipeline() checks it against the task's models; save_pretrained writes it into `architectures`).",
        "import transformers as _transformers  # noqa: E402",
        "",
        f"HFPRUNE_VERSION = {__version__!r}",
        "",
    ]
    auto_map = {}
    for name in classes:
        if not hasattr(transformers, name):
            raise ValueError(f"cannot write remote code for {name}: transformers exports no such class")
        lines += ["", f"class {name}(PrunedModelMixin, _transformers.{name}):",
                  f'    """``transformers.{name}`` with the shapes of the plan in ``config.hfprune``."""', ""]
        for auto_name in auto_classes_for(model.config.model_type, name) or fallback_auto_classes(name):
            auto_map.setdefault(auto_name, f"{MODELING_FILE[:-3]}.{name}")
    if not auto_map:
        raise ValueError(f"no transformers auto class maps model_type {model.config.model_type!r} to {base.__name__}")
    (directory / MODELING_FILE).write_text("\n".join(lines).rstrip() + "\n")
    for package_name, name in structure.ENGINE_FILES.items():  # the modeling file imports them (relatively)
        (directory / name).write_text(engine_source(package_name))
    return auto_map


# For head classes transformers maps to no auto class (the time-series forecasters but TimesFM): the auto class
# whose task they perform. With ``trust_remote_code`` an auto class loads whatever its ``auto_map`` entry names.
FALLBACK_AUTO_CLASSES = {"ForPrediction": "AutoModelForTimeSeriesPrediction"}


def fallback_auto_classes(class_name: str) -> list:
    """The auto class a head class unknown to transformers' auto mappings is saved under, by its task suffix."""
    return [auto for suffix, auto in FALLBACK_AUTO_CLASSES.items()
            if class_name.endswith(suffix) and hasattr(transformers, auto)]


def auto_classes_for(model_type: str, class_name: str) -> list:
    """Names of the ``AutoModel*`` classes that map ``model_type`` to ``class_name``."""
    found = []
    for auto_name in dir(transformers):
        if not auto_name.startswith("AutoModel"):
            continue
        mapping = getattr(getattr(transformers, auto_name), "_model_mapping", None)
        names = getattr(mapping, "_model_mapping", {}).get(model_type)
        if names == class_name or (isinstance(names, (list, tuple)) and class_name in names):
            found.append(auto_name)
    return sorted(found)

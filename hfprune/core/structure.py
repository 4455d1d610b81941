# Copyright hfprune contributors. Apache-2.0.
"""The structure engine: slices a transformers model to a prune plan, and rebuilds the pruned shapes on reload.

The engine is this file and its three siblings (:data:`ENGINE_FILES`: the specs, the module primitives, the
slicing). They import only ``torch``, ``transformers`` (lazily) and each other, on purpose: every heterogeneous
pruned checkpoint carries them as its modeling code (this file as ``modeling_hfprune.py``, the siblings under their
own names, which the relative imports below name; transformers copies a remote module's relative imports with it),
so ``from_pretrained(dir, trust_remote_code=True)`` rebuilds the pruned shapes with exactly the code that produced
them, in a process without hfprune.

The architecture knowledge comes in as data (:class:`ArchSpec`, stored in the checkpoint's config as JSON)
and the plan in its JSON form (``{"layers": [{"heads": [...], "ffn": [...], "drop": bool}, ...]}``).
Validation of plans happens before this code runs (``hfprune.core.plan``); this module trusts its input.
"""

from __future__ import annotations

import inspect
import json
import math
import os

import torch
from torch import nn

# The engine's names, re-exported: ``hfprune.core.structure`` is the one import path for the rest of hfprune.
from .structure_modules import (  # noqa: F401
    EmptyAttention,
    EmptyFfn,
    base_layer,
    get_module,
    head_rows,
    in_features,
    is_conv1d,
    out_features,
    set_module,
    slice_input,
    slice_output,
)
from .structure_slicing import (  # noqa: F401
    apply_structure,
    attention_dims,
    expert_dims,
    ffn_width,
    hidden_sites,
    prune_attention,
    prune_experts,
    prune_ffn,
    prune_hidden,
    without_dropped,
)
from .structure_specs import ArchSpec, AttentionSpec, ExpertsSpec, FfnSpec, HiddenSpec, StackSpec  # noqa: F401

# The engine's other files, by their name in this package and in a checkpoint (where this file is MODELING_FILE).
# The checkpoint names carry the modeling file's prefix so they cannot be taken for a user's own files; the
# relative imports between the files are renamed with them (:func:`checkpoint_source`).
ENGINE_FILES = {"structure_specs.py": "modeling_hfprune_specs.py",
                "structure_modules.py": "modeling_hfprune_modules.py",
                "structure_slicing.py": "modeling_hfprune_slicing.py"}

# ----------------------------------------------------------------------------------------------
# Reloading: the generated modeling file subclasses the original transformers class with this mixin.

HFPRUNE_CONFIG_KEY = "hfprune"
MODELING_FILE = "modeling_hfprune.py"  # this file's name in a checkpoint
PLAN_FILE = "prune_plan.json"
# The hfprune version that wrote this code: a checkpoint's modeling_hfprune.py sets it below this file's text, and
# prune_plan.json records it.
HFPRUNE_VERSION: str | None = None
# Arguments of ``save_pretrained(..., push_to_hub=True)`` that say where and how to push, not what to save.
HUB_ARGUMENTS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr",
                 "tags")


class PrunedModelMixin:
    """Rebuilds the pruned shapes right after the stock ``__init__``; loading then fills the weights.

    A checkpoint's ``modeling_hfprune.py`` defines ``class X(PrunedModelMixin, transformers.X)``: the class keeps
    the stock class's name, because transformers identifies models by class name (``pipeline(...)`` checks it
    against the task's supported models, and ``save_pretrained`` writes it into ``architectures``).
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = getattr(config, HFPRUNE_CONFIG_KEY, None)
        if not record:
            raise ValueError(
                f"{type(self).__name__} needs `config.{HFPRUNE_CONFIG_KEY}` (the prune plan and architecture "
                "spec written by hfprune); this config has none."
            )
        spec = ArchSpec.from_dict(record["arch"])
        plan = without_dropped(record["plan"])
        for key, stack in spec.stacks.items():
            layers = len(get_module(self.base_model, stack.layers))
            if plan.get(key) is not None and len(plan[key]) != layers:
                raise ValueError(
                    f"config.{HFPRUNE_CONFIG_KEY}.plan['{key}'] keeps {len(plan[key])} layers but the config builds "
                    f"{layers}: the checkpoint's config is inconsistent"
                )
        apply_structure(self.base_model, config, spec, plan)
        if plan.get("hidden") is not None and spec.hidden is not None:
            prune_hidden(self, spec, plan["hidden"])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = load_compact_sparse(cls, pretrained_model_name_or_path, args, kwargs)
        return model if model is not None else super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus the ``prune_plan.json`` hfprune writes beside every pruned
        checkpoint (the plan, the dense model's sizes and ``base_model``, from ``config.hfprune``): a reloaded
        checkpoint saved or pushed again keeps its provenance. With ``push_to_hub=True`` the folder is saved, then
        the model is pushed with ``push_to_hub`` (which saves through this method too): transformers would upload
        from inside its own save, before the plan file is written."""
        save, hub = split_save_arguments(super().save_pretrained, save_directory, *args, **kwargs)
        result = super().save_pretrained(**save)
        if not save.get("is_main_process", True):
            return result
        record = getattr(self.config, HFPRUNE_CONFIG_KEY, None) or {}
        if isinstance(record.get("plan"), dict):
            text = plan_file_text(record["plan"], self.config.model_type, HFPRUNE_VERSION)
            with open(os.path.join(os.fspath(save["save_directory"]), PLAN_FILE), "w") as f:
                f.write(text)
        if hub is not None:
            if "max_shard_size" in save:
                hub["max_shard_size"] = save["max_shard_size"]
            self.push_to_hub(**hub)
        return result

    @staticmethod
    def _finalize_model_loading(model, *args, **kwargs):
        # transformers' step after the checkpoint's tensors are loaded (5.x). Inside a pruned stack every tensor
        # must match what the plan rebuilt: a size mismatch, a missing or an unexpected key there means the plan
        # and the tensors disagree, and reinitialising (or dropping) weights would silently change the model.
        info = kwargs["loading_info"] if "loading_info" in kwargs else args[-1]
        _check_pruned_load(model, info, after=False)
        result = super(PrunedModelMixin, type(model))._finalize_model_loading(model, *args, **kwargs)
        _check_pruned_load(model, info if result is None else result, after=True)
        return result


def load_compact_sparse(cls, path, args: tuple, kwargs: dict):
    """``cls.from_pretrained`` of a compact sparse checkpoint (its ``sparsity_plan.json`` says ``"compact": true``;
    written by ``hfprune.save_sparse``): each sparse weight ``name`` is stored as ``name.__bitmask`` (uint8, bit
    ``k % 8`` of byte ``k // 8`` keeps flat element ``k``), ``name.__values`` (the kept elements) and
    ``name.__shape``, made dense here before loading. ``None`` for any other checkpoint."""
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if k in kwargs}

    def get(name):
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)

    plan = get("sparsity_plan.json") if path is not None else None
    if plan is None:
        return None
    with open(plan, encoding="utf-8") as f:
        if not json.load(f).get("compact"):
            return None
    index = get("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in files if index is not None else ["model.safetensors"]:
        tensors.update(load_file(get(name)))
    bits, state = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8), {}
    for key, value in tensors.items():
        if key.endswith(".__bitmask"):
            name = key[: -len(".__bitmask")]
            shape, values = tensors[name + ".__shape"].tolist(), tensors[name + ".__values"]
            keep = value.unsqueeze(1).bitwise_and(bits).ne(0).flatten()[: math.prod(shape)]
            dense = values.new_zeros(keep.numel())
            dense[keep] = values
            state[name] = dense.reshape(shape)
        elif not key.endswith((".__values", ".__shape")):
            state[key] = value
    config = kwargs.pop("config", None) or cls.config_class.from_pretrained(path, **hub)
    return super(PrunedModelMixin, cls).from_pretrained(None, *args, config=config, state_dict=state, **kwargs)


def _check_pruned_load(model: nn.Module, info, after: bool) -> None:
    """Raise a ValueError for a tensor of a pruned stack that the checkpoint does not supply as it was saved."""
    record = getattr(model.config, HFPRUNE_CONFIG_KEY, None) or {}
    stacks = ArchSpec.from_dict(record["arch"]).stacks.values() if record.get("arch") else ()
    prefix = getattr(model, "base_model_prefix", "") or ""
    roots = tuple(f"{s.layers}." for s in stacks) + tuple(f"{prefix}.{s.layers}." for s in stacks if prefix)

    def in_stack(key: str) -> bool:  # keys are named from the model loaded, or from a model with the prefix
        return bool(roots) and key.startswith(roots)

    where = f"{type(model).__name__} from a checkpoint pruned by hfprune"
    hint = f"config.{HFPRUNE_CONFIG_KEY}.plan does not describe the saved tensors (was config.json edited?)"
    if not after:
        bad = sorted((k, tuple(a), tuple(b)) for k, a, b in getattr(info, "mismatched_keys", ()) if in_stack(k))
        if bad:
            lines = "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in bad)
            raise ValueError(f"{where}: size mismatch for {lines}. {hint}")
        return
    missing = sorted(k for k in getattr(info, "missing_keys", ()) if in_stack(k))
    unexpected = sorted(k for k in getattr(info, "unexpected_keys", ()) if in_stack(k))
    if missing or unexpected:
        parts = ([f"missing from the checkpoint: {missing}"] if missing else []) + (
            [f"in the checkpoint but not in the model: {unexpected}"] if unexpected else [])
        raise ValueError(f"{where}: {'; '.join(parts)}. {hint}")


def checkpoint_source(text: str) -> str:
    """An engine file's source as a checkpoint carries it: relative imports of its siblings renamed."""
    for package_name, checkpoint_name in ENGINE_FILES.items():
        text = text.replace(f"from .{package_name[:-3]} import", f"from .{checkpoint_name[:-3]} import")
    return text


def plan_file_text(plan: dict, model_type: str | None, version: str | None) -> str:
    """The text of ``prune_plan.json``: ``plan`` in its JSON form, with the model type and the hfprune version."""
    head = {"hfprune_version": version} if version is not None else {}
    return json.dumps({**head, "model_type": model_type, **plan}, indent=1) + "\n"


def split_save_arguments(method, *args, **kwargs) -> tuple:
    """``(save, hub)`` for a call ``save_pretrained(*args, **kwargs)`` of ``method`` (a bound transformers
    ``save_pretrained``). ``save``: the call's arguments as keywords, without ``push_to_hub``. ``hub``: ``None``, or
    with ``push_to_hub=True`` the keywords of ``push_to_hub`` (:data:`HUB_ARGUMENTS`, taken out of ``save``;
    ``repo_id`` defaults to the folder's name, as in transformers). Any other argument transformers does not know
    is refused when pushing: transformers would hand it to ``create_repo``."""
    signature = inspect.signature(method)
    bound = signature.bind(*args, **kwargs)
    save = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            save.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"save_pretrained got {len(value)} positional arguments too many")
        else:
            save[name] = value
    if not save.pop("push_to_hub", False):
        return save, None
    hub = {name: save.pop(name) for name in HUB_ARGUMENTS if name in save}
    unknown = sorted(set(save) - set(signature.parameters))
    if unknown:
        raise TypeError(f"save_pretrained(push_to_hub=True) got unknown arguments {unknown}; the Hub arguments "
                        f"are {list(HUB_ARGUMENTS)}")
    if hub.get("repo_id") is None:
        hub["repo_id"] = os.path.basename(os.path.normpath(os.fspath(save["save_directory"])))
    return save, hub

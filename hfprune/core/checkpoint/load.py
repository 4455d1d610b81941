# Copyright hfprune contributors. Apache-2.0.
"""Load any checkpoint hfprune wrote with the installed hfprune: no code from the checkpoint ever runs.

A heterogeneous checkpoint carries ``modeling_hfprune.py`` so that people without hfprune can load it with
``trust_remote_code=True``. hfprune itself does not need that file: ``config.json`` holds the plan and the
architecture spec, so :func:`from_pretrained` builds ``class X(PrunedModelMixin, X)`` here, from the installed
``hfprune.core.structure`` and the stock transformers class ``X``, and loads the weights into it. A checkpoint is read
only after its three accounts of the pruning agree: ``prune_plan.json``, ``config.json`` (its ``hfprune`` record,
or for a plain checkpoint its widths) and the weights. Plain and non-hfprune checkpoints load as stock
transformers models (a plain one is marked pruned with its ``prune_plan.json``, so pruning it again composes).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import transformers
from torch import nn

from .. import structure
from ..plan import ATTENTION_BLOCKS, PlanError, PrunePlan

logger = logging.getLogger("hfprune")

CONFIG_FILE = "config.json"
# Arguments of transformers' from_pretrained that say where files come from: used to fetch a Hub snapshot,
# then the model loads from the local copy.
DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

_PRUNED_CLASSES: dict = {}


def from_pretrained(name_or_path: str | Path, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint (local folder or Hub repo id) that hfprune saved, with no code from the checkpoint.

    Args:
        name_or_path: a checkpoint folder, or a Hub repo id (downloaded with ``huggingface_hub``, which honours
            ``HF_ENDPOINT``; ``revision``, ``token``, ``cache_dir``, ``force_download``, ``local_files_only`` apply).
        model_class: a transformers model class or auto class (``AutoModelForCausalLM``); default: the class
            ``config.json``'s ``architectures`` names.
        kwargs: passed to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ``attn_implementation``,
            ``num_labels``...). ``trust_remote_code`` is refused: it is never needed.

    A heterogeneous checkpoint returns its stock class under hfprune's pruned subclass (``save_pretrained`` writes
    it back, ``apply_plan`` prunes it further); ``model.hfprune_plan`` is its plan. A ``ValueError`` names the
    layer and block (or the tensor and both shapes) where ``prune_plan.json``, ``config.json`` and the weights
    disagree.

    Example:

    ```python
    >>> import hfprune
    >>> model = hfprune.from_pretrained("outputs/minilm-movie-oneshot")  # doctest: +SKIP
    >>> model.hfprune_plan.dense["layers"][0]  # doctest: +SKIP
    {'heads': (12, 12), 'ffn': (1536,)}
    ```
    """
    if "trust_remote_code" in kwargs:
        raise ValueError("hfprune.from_pretrained never runs code from a checkpoint, so it takes no "
                         "trust_remote_code: it rebuilds pruned models with the installed hfprune. Drop the argument.")
    _recover(name_or_path)
    directory = checkpoint_dir(name_or_path, kwargs)
    config = read_config(directory)
    stock = stock_class(config, model_class)
    plan, heterogeneous = checkpoint_plan(directory, config)
    cls = pruned_class(stock) if heterogeneous else stock
    from .sparse import read_compact

    dense = read_compact(directory)  # a compact sparse checkpoint: bit masks and kept values, decompressed here
    if dense is None:
        model = cls.from_pretrained(directory, **kwargs)
    else:
        config_obj = kwargs.pop("config", None) or stock.config_class.from_pretrained(directory)
        model = cls.from_pretrained(None, config=config_obj, state_dict=dense, **kwargs)
    # auto_map points at the checkpoint's code, which this model does not use; saving writes a fresh one if needed
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    if plan is None:
        return model
    spec = _spec(model, config, heterogeneous)
    if spec is None:
        return model
    check_widths(model, plan, spec, PLAN_SOURCE if not heterogeneous else RECORD_SOURCE)
    if plan.dense is None and heterogeneous:  # a record written before plans carried the dense sizes
        from ..apply import config_dims

        plan = plan.with_dense(config_dims(model, spec, plan))
    from .pruned import mark_pruned

    mark_pruned(model, plan, heterogeneous=heterogeneous)
    return model


class AutoPrunedModel:
    """Auto-class-like entry point for :func:`from_pretrained`: ``AutoPrunedModel.from_pretrained(path)`` loads
    any checkpoint hfprune saved, as the class its ``config.json`` names, without running the checkpoint's code.

    Example:

    ```python
    >>> from hfprune import AutoPrunedModel
    >>> model = AutoPrunedModel.from_pretrained("me/minilm-movie-pruned", revision="main")  # doctest: +SKIP
    ```
    """

    def __init__(self, *args, **kwargs):
        raise OSError("AutoPrunedModel is not instantiated: use AutoPrunedModel.from_pretrained(name_or_path)")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> nn.Module:
        return from_pretrained(name_or_path, **kwargs)


# ---- Files ---------------------------------------------------------------------------------------------------

PLAN_SOURCE = "prune_plan.json"
RECORD_SOURCE = "config.json's hfprune.plan"


def _recover(name_or_path) -> None:
    # Finish or undo a save that was interrupted in this folder, so we read one save's files, not two.
    # (hfprune.core.checkpoint.transaction may be absent in a partial install; loading works without it.)
    if importlib.util.find_spec(f"{__package__}.transaction") is None:
        return
    from .transaction import recover

    recover(name_or_path)


def checkpoint_dir(name_or_path: str | Path, kwargs: dict) -> Path:
    """The local folder to load: ``name_or_path`` itself, or the files of the Hub repo of that id that loading
    reads (configs, plan, weights: never code). Pops the download arguments from ``kwargs``; ``subfolder`` is
    joined to the folder."""
    download = {k: kwargs.pop(k) for k in DOWNLOAD_KWARGS if k in kwargs}
    download.pop("proxies", None)  # huggingface_hub >= 1 takes proxies from the environment only
    subfolder = kwargs.pop("subfolder", None) or ""
    path = Path(name_or_path)
    directory = path / subfolder if path.is_dir() else _download(str(name_or_path), subfolder, download)
    if not (directory / CONFIG_FILE).is_file():
        raise OSError(f"{directory} has no {CONFIG_FILE}: not a saved model")
    return directory


def _download(repo_id: str, subfolder: str, download: dict) -> Path:
    """Fetch a checkpoint's files from the Hub (``HF_ENDPOINT``) into the cache; the folder that holds them.

    File by file with ``hf_hub_download``, all at the commit ``config.json`` resolved to, so a push in between
    cannot mix two versions.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def get(name: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, subfolder=subfolder or None, **download))
        except EntryNotFoundError:
            if required:
                raise
            return None

    try:
        config = get(CONFIG_FILE)
    except Exception as err:  # noqa: BLE001 - re-raised with what was looked for
        raise OSError(f"{repo_id!r} is not a local folder, and its {CONFIG_FILE} could not be fetched from the Hub "
                      f"({type(err).__name__}: {err})") from err
    snapshot = config.parents[len(Path(subfolder).parts)] if subfolder else config.parent
    download["revision"] = snapshot.name  # the commit, as the cache names the snapshot folder
    for name in (PLAN_SOURCE, "generation_config.json", "sparsity_plan.json"):  # the last: compact sparse weights
        get(name, required=False)
    index = get(WEIGHTS_INDEX, required=False)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else [WEIGHTS_FILE]
    for name in shards:
        get(name)
    return config.parent


def is_hfprune_checkpoint(directory: str | Path) -> bool:
    """Whether a local folder holds a checkpoint hfprune pruned (a ``prune_plan.json``, or hfprune's record in
    ``config.json``)."""
    directory = Path(directory)
    if (directory / PLAN_SOURCE).is_file():
        return True
    try:
        return structure.HFPRUNE_CONFIG_KEY in read_config(directory)
    except (OSError, ValueError):
        return False


def read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{directory / CONFIG_FILE} must hold a JSON object")
    return config


def read_plan_file(directory: Path) -> PrunePlan | None:
    """``prune_plan.json`` (what hfprune writes beside every pruned checkpoint), or ``None`` when absent."""
    path = Path(directory) / PLAN_SOURCE
    if not path.is_file():
        return None
    try:
        return PrunePlan.from_json(path)
    except (PlanError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def checkpoint_plan(directory: Path, config: dict) -> tuple:
    """``(plan, heterogeneous)`` of a checkpoint, once ``prune_plan.json`` and ``config.json`` agree; ``(None,
    False)`` for a checkpoint hfprune did not prune. Raises ``ValueError`` naming where they disagree."""
    file_plan = read_plan_file(directory)
    model_type = config.get("model_type")
    if file_plan is not None and file_plan.model_type not in (None, model_type):
        raise ValueError(f"{directory}: {PLAN_SOURCE} is for model_type {file_plan.model_type!r} but config.json "
                         f"is {model_type!r}")
    record = config.get(structure.HFPRUNE_CONFIG_KEY)
    if record is None:
        return file_plan, False
    if not isinstance(record, dict) or not isinstance(record.get("plan"), dict) or "arch" not in record:
        raise ValueError(f"{directory}: config.json's {structure.HFPRUNE_CONFIG_KEY} record needs 'plan' and 'arch'")
    try:
        plan = PrunePlan.from_dict(record["plan"])
    except PlanError as err:
        raise ValueError(f"{directory}: {RECORD_SOURCE}: {err}") from None
    if file_plan is None:
        logger.warning("%s has no %s; trusting config.json, whose plan is what the weights were built with",
                       directory, PLAN_SOURCE)
        return plan, True
    try:
        compare_plans(file_plan, plan)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}. The checkpoint was edited or mixed with another; re-save it from "
                         "the pruned model") from None
    if plan.dense is None and file_plan.dense is not None:
        plan = plan.with_dense(file_plan.dense)
    return plan, True


def compare_plans(a: PrunePlan, b: PrunePlan, names: tuple = (PLAN_SOURCE, RECORD_SOURCE)) -> None:
    """Raise ``ValueError`` naming the first stack, layer and block where plans ``a`` and ``b`` differ."""
    sa, sb = a.stacks(), b.stacks()
    if a.hidden != b.hidden:
        raise ValueError(f"hidden: {names[0]} keeps {_describe(a.hidden)}, {names[1]} keeps {_describe(b.hidden)}")
    if set(sa) != set(sb):
        raise ValueError(f"{names[0]} has stacks {sorted(sa)}, {names[1]} has {sorted(sb)}")
    for key in sa:
        if len(sa[key]) != len(sb[key]):
            raise ValueError(f"'{key}': {names[0]} has {len(sa[key])} layers, {names[1]} has {len(sb[key])}")
        for i, (x, y) in enumerate(zip(sa[key], sb[key])):
            if x.drop != y.drop:
                where = (names[0], names[1]) if x.drop else (names[1], names[0])
                raise ValueError(f"{key}[{i}]: {where[0]} drops the layer, {where[1]} keeps it")
            for name in sorted(set(x.blocks) | set(y.blocks)):
                if x.get(name) != y.get(name):
                    raise ValueError(f"{key}[{i}].{name}: {names[0]} keeps {_describe(x.get(name))}, {names[1]} "
                                     f"keeps {_describe(y.get(name))}")
    if a.dense is not None and b.dense is not None:
        for key in sa:
            for i, (x, y) in enumerate(zip(a.dense[key], b.dense[key])):
                for name in sorted(set(x) | set(y)):
                    if x.get(name) != y.get(name):
                        raise ValueError(f"dense {key}[{i}].{name}: {names[0]} says {list(x.get(name) or [])}, "
                                         f"{names[1]} says {list(y.get(name) or [])}")


def _describe(keep) -> str:
    if keep is None:
        return "all"
    shown = ", ".join(str(k) for k in keep[:8]) + (", ..." if len(keep) > 8 else "")
    return f"{len(keep)} [{shown}]"


# ---- Classes -------------------------------------------------------------------------------------------------


def stock_class(config: dict, model_class: type | None = None) -> type:
    """The transformers class to load with: ``model_class`` (an auto class resolves by ``model_type``), else the
    class ``architectures`` names. Never a class from a checkpoint."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .classes import class_under

    model_type = config.get("model_type")
    version = transformers.__version__
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json has model_type {model_type!r}, which transformers {version} does not know: "
                         "upgrade transformers")
    names = config.get("architectures") or []
    if model_class is None:
        if not names:
            raise ValueError("config.json names no class in `architectures`: pass model_class= (a transformers "
                             "class or auto class such as AutoModelForCausalLM)")
        model_class = getattr(transformers, names[0], None)
        if model_class is None:
            raise ValueError(f"config.json's architectures names {names[0]}, which transformers {version} does not "
                             "have: upgrade transformers, or pass model_class=")
    if hasattr(model_class, "_model_mapping"):  # an auto class
        model_class = _from_auto(model_class, CONFIG_MAPPING[model_type], names, model_type)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"model_class must be a transformers model class or auto class, got {model_class!r}")
    return class_under(model_class)


def _from_auto(auto: type, config_class: type, names: list, model_type: str) -> type:
    from .save import fallback_auto_classes

    mapping = auto._model_mapping
    if config_class in mapping:
        found = mapping[config_class]
        if isinstance(found, (list, tuple)):
            by_name = {c.__name__: c for c in found}
            return next((by_name[n] for n in names if n in by_name), found[0])
        return found
    # head classes no auto mapping names (time-series forecasters): the architectures class, if it does that task
    for name in names:
        if auto.__name__ in fallback_auto_classes(name) and hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"{auto.__name__} has no class for model_type {model_type!r} in transformers "
                     f"{transformers.__version__}; pass the model class itself")


def pruned_class(stock: type) -> type:
    """``class X(PrunedModelMixin, X)`` built here from the installed ``hfprune.core.structure`` (one per class;
    named like the stock class ``X``, as a checkpoint's code names it)."""
    if stock not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[stock] = type(stock.__name__, (structure.PrunedModelMixin, stock), {
            "__module__": __name__, "__qualname__": stock.__name__, "__doc__": f"{stock.__name__}, pruned by hfprune."})
    return _PRUNED_CLASSES[stock]


# ---- Checks after loading -----------------------------------------------------------------------------------


def _spec(model: nn.Module, config: dict, heterogeneous: bool):
    """The architecture spec to measure the loaded model with: the checkpoint's record for a heterogeneous one
    (it was rebuilt from it), else the installed adapter's; ``None`` for a family this hfprune does not know."""
    if heterogeneous:
        return structure.ArchSpec.from_dict(config[structure.HFPRUNE_CONFIG_KEY]["arch"])
    from ..arch import get_adapter

    try:
        return get_adapter(model).arch_spec(model.config)
    except ValueError:
        logger.warning("hfprune does not know model_type %r: %s not checked, the model is loaded as stock",
                       config.get("model_type"), PLAN_SOURCE)
        return None


def check_widths(model: nn.Module, plan: PrunePlan, spec, source: str) -> None:
    """Raise ``ValueError`` naming the layer and block where the loaded model's widths are not what ``plan``
    leaves: for a plain checkpoint, ``prune_plan.json`` against the widths config.json states."""
    from ..apply import model_dims

    dims = model_dims(model, spec)
    kept = plan.kept_dims()
    if plan.hidden is not None and spec.hidden is not None:
        from ..hidden import hidden_size

        if hidden_size(model, spec) != len(plan.hidden):
            raise ValueError(f"hidden: {source} keeps {len(plan.hidden)} hidden channels, the checkpoint's config and "
                             f"weights have {hidden_size(model, spec)}")
    for key, layers in plan.stacks().items():
        if key not in dims:
            raise ValueError(f"{source} prunes stack '{key}', which the model does not have")
        index = [i for i, layer in enumerate(layers) if not layer.drop]
        if len(index) != len(dims[key]):
            raise ValueError(f"{source} keeps {len(index)} of the {len(layers)} layers of '{key}' but the checkpoint "
                             f"has {len(dims[key])}")
        for j, i in enumerate(index):
            for name, now in dims[key][j].items():
                keep = layers[i].get(name)
                if kept is not None:
                    want = kept[key][i].get(name, now)
                elif keep is not None:
                    want = (len(keep),) + tuple(now[1:]) if name in ATTENTION_BLOCKS else (len(keep),)
                else:
                    continue  # kept whole, and the dense size is not recorded
                if tuple(want) != tuple(now):
                    unit = "heads (query, key/value)" if name in ATTENTION_BLOCKS else "neurons"
                    raise ValueError(f"{key}[{i}].{name}: {source} leaves {list(want)} {unit}, the checkpoint's "
                                     f"config and weights have {list(now)}")

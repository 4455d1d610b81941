# Copyright hfprune contributors. Apache-2.0.
"""``apply_plan``: validate a plan against a model, slice it physically, keep its config truthful."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from . import structure
from .arch import Adapter, get_adapter
from .blocks import iter_blocks, iter_stacks
from .hidden import check_hidden, dense_hidden_updates, hidden_size, hidden_updates
from .plan import ATTENTION_BLOCKS, HIDDEN, PlanError, PrunePlan, expert_neurons, hub_id
from .structure import HFPRUNE_CONFIG_KEY, ArchSpec, attention_dims, get_module

logger = logging.getLogger("hfprune")

RECORD_FORMAT = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft or DDP/accelerate wrapper."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def model_dims(model: nn.Module, spec: ArchSpec | None = None) -> dict:
    """Per stack, per layer, per block: ``(heads, kv_heads)`` for attention and ``(neurons,)`` for FFNs."""
    model = unwrap(model)
    spec = spec or get_adapter(model).arch_spec(model.config)
    dims = {key: [{} for _ in layers] for key, _, layers in iter_stacks(model, spec)}
    for block in iter_blocks(model, spec):
        units, kv_units, _ = block.dims()
        dims[block.key.stack][block.key.index][block.key.name] = (units, kv_units) if block.is_attention else (units,)
    return dims


def as_plan(plan) -> PrunePlan:
    if isinstance(plan, PrunePlan):
        return plan
    if isinstance(plan, dict):
        return PrunePlan.from_dict(plan)
    hint = "; read a JSON file with PrunePlan.from_json(path)" if isinstance(plan, str) else ""
    raise TypeError(f"plan must be a PrunePlan or its dict form, got {type(plan).__name__}{hint}")


def as_model(model) -> nn.Module:
    """The transformers model to prune (under any peft/DDP wrapper), or an error that says what is wrong with it."""
    from .arch import supported_model_types

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    target = unwrap(model)
    if getattr(getattr(target, "config", None), "model_type", None) is None or not hasattr(target, "base_model"):
        raise TypeError(f"model must be a transformers PreTrainedModel of a supported model_type, got a plain "
                        f"{type(target).__name__} (no config.model_type); supported: "
                        f"{', '.join(supported_model_types())}")
    get_adapter(target)  # an unsupported model_type: a ValueError that lists the supported ones
    return target


def apply_plan(model: nn.Module, plan: PrunePlan | dict) -> nn.Module:
    """Physically prune ``model`` to ``plan`` in place and return it.

    The config follows: layer counts always; widths where the vanilla config can express the result
    (uniform FFN width, uniform heads where the family has an explicit ``head_dim``). Otherwise the plan
    is recorded in ``config.hfprune`` and ``save_pretrained`` writes a checkpoint with its own modeling code.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> import hfprune
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64))
    >>> model = hfprune.apply_plan(model, {"layers": [{"heads": [0, 3], "ffn": list(range(16))}, {"drop": True}]})
    >>> model.config.num_hidden_layers, model.encoder.layer[0].attention.self.query.out_features
    (1, 16)
    ```
    """
    target = as_model(model)
    plan = as_plan(plan)
    adapter = get_adapter(target)
    spec = adapter.arch_spec(target.config)
    check_plan(target, plan, adapter, spec)
    dims = model_dims(target, spec)
    previous, from_record = earlier_plan(target, spec, dims)
    if previous is None and plan.dense is not None and _dims_key(_stack_dims(plan.dense)) != _dims_key(dims):
        raise PlanError("the plan records dense dimensions (`dense`) that are not this model's: its indices are "
                        "for another model (apply a prune_plan.json's plan to the dense model it was made for)")
    own_config(model, target)  # the config may be shared with other models, which must not change

    if previous is None:
        # a model loaded by Hub id names its source (a local path is no id)
        total = dataclasses.replace(plan.with_dense(dims), model_type=target.config.model_type,
                                    base_model=plan.base_model or hub_id(getattr(target.config, "_name_or_path", None)))
    else:
        total = compose(previous, plan)
    if total.hidden is not None and (total.dense is not None and HIDDEN not in total.dense):
        size = hidden_size(target, spec) if previous is None or previous.hidden is None else None
        if size is not None:  # the dense hidden size, which the indices of ``hidden`` refer to
            total = dataclasses.replace(total, dense={HIDDEN: size, **total.dense})
    structure.apply_structure(target.base_model, target.config, spec, plan.to_dict())
    if plan.hidden is not None:
        structure.prune_hidden(target, spec, list(plan.hidden))

    updates = vanilla_updates(adapter, target, total)
    if updates is not None:
        for name, value in updates.items():
            setattr(target.config, name, value)
        if isinstance(getattr(target, "num_experts", None), int):  # MoE heads read it for the auxiliary loss
            target.num_experts = getattr(target.config, "num_experts", target.num_experts)
        if hasattr(target.config, HFPRUNE_CONFIG_KEY):
            delattr(target.config, HFPRUNE_CONFIG_KEY)
    else:
        if previous is not None and not from_record and not _restore_dense_widths(adapter, target.config, total):
            # the config cannot state the dense widths again: the record starts from the widths it states now
            logger.warning("the config cannot state the dense widths again; the saved plan starts from the "
                           "pruned widths the config states")
            total = dataclasses.replace(plan.with_dense(dims), model_type=total.model_type,
                                        base_model=total.base_model)
        setattr(target.config, HFPRUNE_CONFIG_KEY, {
            "format": RECORD_FORMAT, "arch": spec.to_dict(), "plan": total.to_dict(),
        })
    from .checkpoint.pruned import mark_pruned  # local: checkpoint imports this module

    mark_pruned(target, total, heterogeneous=updates is None)
    return model


def own_config(model: nn.Module, target: nn.Module) -> None:
    """Give ``target`` a deep copy of its config, re-pointing every module attribute that held the old one.

    Pruning edits the config (layer counts, widths, the hfprune record); two models built from one config
    object would otherwise both change, and the other one would then describe weights it does not have.
    """
    from transformers import PreTrainedConfig

    old = target.config
    new = copy.deepcopy(old)
    swap = {id(old): new}
    for name, value in vars(old).items():  # sub-configs of composite configs, held by their own submodules
        if isinstance(value, PreTrainedConfig) and hasattr(new, name):
            swap[id(value)] = getattr(new, name)
    for module in model.modules():
        current = module.__dict__.get("config")
        if current is not None and id(current) in swap:
            module.__dict__["config"] = swap[id(current)]


def earlier_plan(model: nn.Module, spec: ArchSpec, dims: dict) -> tuple:
    """``(plan, from_record)``: the plan ``model`` was already pruned with, relative to its dense model, or
    ``(None, False)`` when it has none (a dense model, or one pruned outside hfprune's view).

    A heterogeneous model's config record is the truth (it is what the weights are built with). A plainly pruned
    one carries its plan as ``hfprune_plan`` (set by ``apply_plan`` or ``hfprune.from_pretrained``); it counts
    only with its ``dense`` dimensions and when it leaves exactly the widths the model has.
    """
    record = getattr(model.config, HFPRUNE_CONFIG_KEY, None)
    if record:
        plan = PrunePlan.from_dict(record["plan"])
        return (plan if plan.dense is not None else plan.with_dense(config_dims(model, spec, plan))), True
    plan = getattr(model, "hfprune_plan", None)
    if not isinstance(plan, PrunePlan) or plan.dense is None:
        return None, False
    if plan.hidden is not None and len(plan.hidden) != hidden_size(model, spec):
        logger.warning("the model's hfprune_plan does not describe its hidden size; pruning it as a new model")
        return None, False
    kept = {key: list(rows.values()) for key, rows in plan.kept_dims().items()}
    if kept != {key: rows for key, rows in _dims_key(dims).items() if key in kept}:
        logger.warning("the model's hfprune_plan does not describe its current widths; pruning it as a new model")
        return None, False
    return plan, False


def config_dims(model: nn.Module, spec: ArchSpec, plan: PrunePlan) -> dict | None:
    """Dimensions of the model ``model.config`` states (what a heterogeneous record is relative to), one entry per
    layer of ``plan`` (a dropped layer takes the first layer's): a stock model built on the meta device. For
    records written before plans carried ``dense``; ``None`` when it cannot be built."""
    from .checkpoint.classes import original_class  # local: checkpoint imports this module

    config = copy.deepcopy(model.config)
    if hasattr(config, HFPRUNE_CONFIG_KEY):
        delattr(config, HFPRUNE_CONFIG_KEY)
    try:
        with torch.device("meta"):
            stock = original_class(model)(config)
        built = model_dims(stock, spec)
    except Exception as err:  # noqa: BLE001 - a failure only means the dense sizes stay unknown
        logger.info("dense dimensions unknown (%s: %s)", type(err).__name__, err)
        return None
    out = {}
    for key, layers in plan.stacks().items():
        rows = list(built.get(key, ()))
        if not rows:
            return None
        kept = iter(rows)
        out[key] = [rows[0] if layer.drop else next(kept, rows[0]) for layer in layers]
    return out


def _stack_dims(dims: dict) -> dict:
    """``dims`` without the dense hidden size (``model_dims`` states blocks only)."""
    return {k: v for k, v in dims.items() if k != HIDDEN}


def _dims_key(dims: dict) -> dict:
    """Dims in one comparable form: ``{stack: [{block: tuple}]}``."""
    return {k: [{n: tuple(d) for n, d in blocks.items()} for blocks in layers] for k, layers in dims.items()}


def _restore_dense_widths(adapter: Adapter, config, total: PrunePlan) -> bool:
    """Set the width fields of a plainly pruned config back to the dense widths, so that a heterogeneous record
    holds the full plan (relative to the dense model, like ``prune_plan.json``). False where it cannot."""
    updates = {}
    if total.hidden is not None:
        if HIDDEN not in total.dense or adapter.hidden_fields is None:
            return False
        updates.update(dense_hidden_updates(adapter, config, total.dense[HIDDEN]))
    for key, layers in _stack_dims(total.dense).items():
        fields = adapter.fields.get(key)
        if fields is None or not layers:
            continue
        for name, dims in layers[0].items():
            if any(row.get(name) != dims for row in layers):
                return False  # a dense model with per-layer widths: no single field states them
            if name == "heads" and fields.heads is not None:
                updates[fields.heads] = dims[0]
                if fields.kv_heads is not None:
                    updates[fields.kv_heads] = dims[1]
            elif name in fields.ffn:
                updates[fields.ffn[name]] = dims[0] // layers[0]["experts"][0] if name == "expert_ffn" else dims[0]
    if updates and not _config_accepts(config, updates):
        return False
    for name, value in updates.items():
        setattr(config, name, value)
    return True


def check_plan(model: nn.Module, plan: PrunePlan, adapter: Adapter, spec: ArchSpec) -> None:
    """All checks before anything is touched, so a bad plan leaves the model as it was."""
    if plan.model_type is not None and plan.model_type != model.config.model_type:
        raise PlanError(f"the plan is for model_type {plan.model_type!r}, the model is {model.config.model_type!r}")
    plan.validate(model_dims(model, spec))
    check_hidden(model, plan, spec)
    if adapter.check is not None:  # family-specific, more precise messages first
        adapter.check(model.config, plan)
    for key, layers in plan.stacks().items():
        if any(layer.drop for layer in layers) and not spec.stacks[key].droppable:
            raise PlanError(f"{key}[*].drop: layers of this {model.config.model_type} stack cannot be dropped")
    for name, module in model.named_modules():
        # a merged DoRA weight is magnitude/norm-scaled and peft caches that norm per output row for unmerging:
        # slicing it cannot keep the magnitudes right. (Merged plain LoRA slices consistently.)
        merged = set(getattr(module, "merged_adapters", None) or ())
        merged_dora = merged & set(getattr(module, "lora_magnitude_vector", None) or ())
        if merged_dora:
            raise ValueError(f"{name}: DoRA adapter(s) {sorted(merged_dora)} are merged into the base weight; call "
                             "unmerge_adapter() before pruning, or merge_and_unload() and prune the merged model")


def vanilla_updates(adapter: Adapter, model: nn.Module, total: PrunePlan) -> dict | None:
    """Config changes that describe the pruned model with no remote code, or ``None`` if there are none.

    ``total`` is the plan relative to the widths the config states. A model is vanilla-expressible when,
    per stack, every changed block is an FFN or (with an explicit head size) an attention block, kept at
    the same nonzero width in every remaining layer.
    """
    spec = adapter.arch_spec(model.config)
    updates: dict = hidden_updates(adapter, model, spec, total)
    if updates is None:
        return None
    dims = model_dims(model)  # after slicing
    for key, layers in total.stacks().items():
        fields = adapter.fields.get(key)
        kept = [i for i, layer in enumerate(layers) if not layer.drop]
        now = dims[key]
        names = {name for layer in layers for name, keep in layer.blocks.items() if keep is not None}
        for name in sorted(names):
            widths = {now[j][name] for j in range(len(kept))}
            if len(widths) != 1 or fields is None:
                return None
            width = widths.pop()
            if 0 in width:
                return None
            if name in ATTENTION_BLOCKS:
                if name != "heads" or fields.heads is None:
                    return None
                heads, kv_heads = width
                updates[fields.heads] = heads
                if fields.kv_heads is not None:
                    updates[fields.kv_heads] = kv_heads
                elif kv_heads != heads:
                    return None
                if fields.head_dim is not None:
                    attn = adapter.arch_spec(model.config).stacks[key].attention[name]
                    layer0 = get_module(model.base_model, adapter.arch_spec(model.config).stacks[key].layers)[0]
                    updates[fields.head_dim] = attention_dims(layer0, attn)[2]
            else:
                field_name = fields.ffn.get(name)
                if field_name is None:
                    return None
                # expert_ffn counts the neurons of all kept experts; the config states them per expert
                updates[field_name] = width[0] // now[0]["experts"][0] if name == "expert_ffn" else width[0]
    if updates and not _config_accepts(model.config, updates):
        return None  # e.g. LlamaConfig insists hidden_size % num_attention_heads == 0 even with head_dim set
    return updates


def _config_accepts(config, updates: dict) -> bool:
    """Whether the stock config class loads with ``updates``: a plain checkpoint it would reject is no use."""
    try:
        type(config).from_dict({**config.to_dict(), **updates})
    except Exception:  # validation errors (huggingface_hub strict dataclasses) are not ValueErrors
        return False
    return True


def _compose_expert_neurons(layer, nxt, dense: dict | None, key: str, i: int) -> tuple:
    """``expert_ffn`` of ``layer`` then ``nxt``, in the dense model's flat ``e * I + j`` indices: unit ``k`` of the
    pruned model is neuron ``k % I'`` of its expert ``k // I'``, each of which ``layer`` maps back to the dense one."""
    if dense is None:
        raise PlanError(f"{key}[{i}].expert_ffn: the earlier plan records no dense sizes, so neurons inside experts "
                        "cannot be pruned again; prune the dense model with the combined plan")
    row = dense[key][i]
    width = row["expert_ffn"][0] // row["experts"][0]
    experts = layer.get("experts") or tuple(range(row["experts"][0]))
    earlier = None if layer.get("expert_ffn") is None else set(layer.get("expert_ffn"))
    per_expert = {e: [j for j in range(width) if earlier is None or e * width + j in earlier] for e in experts}
    now = max(expert_neurons(layer, row).values(), default=width)  # neurons per expert in the pruned model
    return tuple(sorted(experts[k // now] * width + per_expert[experts[k // now]][k % now]
                        for k in nxt.get("expert_ffn")))


def compose(first: PrunePlan, second: PrunePlan) -> PrunePlan:
    """The single plan equal to applying ``first`` then ``second`` (whose indices refer to the pruned model)."""
    stacks = {}
    for key, layers in first.stacks().items():
        later = iter(second.stacks().get(key, ()))
        out = []
        for i, layer in enumerate(layers):
            if layer.drop:
                out.append(layer)
                continue
            nxt = next(later, None)
            if nxt is None or not nxt.blocks and not nxt.drop:
                out.append(layer)
            elif nxt.drop:
                out.append(nxt)
            else:
                blocks = dict(layer.blocks)
                for name, keep in nxt.blocks.items():
                    if keep is not None:
                        before = blocks.get(name)
                        blocks[name] = tuple(keep) if before is None else tuple(before[k] for k in keep)
                if nxt.get("expert_ffn") is not None:  # flat over the pruned model's experts: not a plain lookup
                    blocks["expert_ffn"] = _compose_expert_neurons(layer, nxt, first.dense, key, i)
                out.append(type(layer)(blocks=blocks))
        stacks[key] = tuple(out)
    hidden = first.hidden if second.hidden is None else tuple(second.hidden) if first.hidden is None \
        else tuple(first.hidden[k] for k in second.hidden)
    return PrunePlan(layers=stacks["layers"], decoder_layers=stacks.get("decoder_layers"),
                     model_type=first.model_type or second.model_type, dense=first.dense,
                     base_model=first.base_model or second.base_model, hidden=hidden)

# Copyright hfprune contributors. Apache-2.0.
"""``apply_plan``: validate a plan against a model, slice it physically, keep its config truthful."""

from __future__ import annotations

from torch import nn

from . import structure
from .arch import Adapter, get_adapter
from .plan import ATTENTION_BLOCKS, PlanError, PrunePlan
from .structure import HFPRUNE_CONFIG_KEY, ArchSpec, attention_dims, ffn_width, get_module

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
    dims = {}
    for key, stack in spec.stacks.items():
        dims[key] = []
        for layer in get_module(model.base_model, stack.layers):
            blocks = {}
            for name, attn in stack.attention.items():
                heads, kv_heads, _ = attention_dims(layer, attn)
                blocks[name] = (heads, kv_heads)
            for name, ffn in stack.ffn.items():
                blocks[name] = (ffn_width(layer, ffn),)
            dims[key].append(blocks)
    return dims


def as_plan(plan) -> PrunePlan:
    if isinstance(plan, PrunePlan):
        return plan
    if isinstance(plan, dict):
        return PrunePlan.from_dict(plan)
    raise TypeError(f"plan must be a PrunePlan or its dict form, got {type(plan).__name__}")


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
    target = unwrap(model)
    plan = as_plan(plan)
    adapter = get_adapter(target)
    spec = adapter.arch_spec(target.config)
    check_plan(target, plan, adapter, spec)

    record = getattr(target.config, HFPRUNE_CONFIG_KEY, None)
    total = compose(PrunePlan.from_dict(record["plan"]), plan) if record else plan
    structure.apply_structure(target.base_model, target.config, spec, plan.to_dict())

    updates = vanilla_updates(adapter, target, total)
    if updates is not None:
        for name, value in updates.items():
            setattr(target.config, name, value)
        if record:
            delattr(target.config, HFPRUNE_CONFIG_KEY)
    else:
        setattr(target.config, HFPRUNE_CONFIG_KEY, {
            "format": RECORD_FORMAT, "arch": spec.to_dict(), "plan": total.to_dict(),
        })
    from .modeling.classes import mark_pruned  # local: modeling imports this module

    mark_pruned(target, total, heterogeneous=updates is None)
    return model


def check_plan(model: nn.Module, plan: PrunePlan, adapter: Adapter, spec: ArchSpec) -> None:
    """All checks before anything is touched, so a bad plan leaves the model as it was."""
    if plan.model_type is not None and plan.model_type != model.config.model_type:
        raise PlanError(f"the plan is for model_type {plan.model_type!r}, the model is {model.config.model_type!r}")
    plan.validate(model_dims(model, spec))
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
    updates: dict = {}
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
                updates[field_name] = width[0]
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


def compose(first: PrunePlan, second: PrunePlan) -> PrunePlan:
    """The single plan equal to applying ``first`` then ``second`` (whose indices refer to the pruned model)."""
    stacks = {}
    for key, layers in first.stacks().items():
        later = iter(second.stacks().get(key, ()))
        out = []
        for layer in layers:
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
                out.append(type(layer)(blocks=blocks))
        stacks[key] = tuple(out)
    return PrunePlan(layers=stacks["layers"], decoder_layers=stacks.get("decoder_layers"),
                     model_type=first.model_type or second.model_type)

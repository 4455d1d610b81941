# Copyright hfprune contributors. Apache-2.0.
"""transformers' ``per_layer_config`` in a per-layer Llama-family checkpoint's ``config.json``.

transformers >= 5.14 lets any config carry ``per_layer_config`` (``{layer index: {attribute: value}}``, plus
``"skip": [...]`` for a sub-layer that is absent), but its Llama, Mistral and Qwen models still build every layer
from the global attributes (checked with 5.24). hfprune writes it anyway, so such a checkpoint loads natively once
those models consume it; until then ``auto_map`` (the checkpoint's code) and ``hfprune.from_pretrained`` are the
working paths, and vLLM serves it through hfprune's plugin.

A config whose ``per_layer_config`` names ``num_attention_heads`` refuses every global read of that attribute
(``AmbiguousGlobalPerLayerAttributeError``, already inside ``LlamaConfig``'s own validation), which would break
those working paths. So the config also sets ``allow_global_per_layer_attribute_access``: the global attributes keep
the sizes the stock class builds before the plan slices it, and transformers logs a warning when it reads them.
Stock ``from_pretrained`` without the code still fails loudly on the mismatched sizes, as before.
"""

from __future__ import annotations

from torch import nn

from .. import structure

PER_LAYER_CONFIG = "per_layer_config"
ALLOW_GLOBAL = "allow_global_per_layer_attribute_access"
# the adapters whose checkpoints get one (their config states head_dim, so per-layer head counts are well defined)
ADAPTERS = ("llama",)


def set_per_layer_config(model: nn.Module, config: dict, heterogeneous: bool) -> None:
    """Write (per-layer checkpoint) or drop (plain one) ``per_layer_config`` in ``config``, a ``config.json`` dict
    of a Llama-family ``model``; configs of other families are left as they are."""
    from ..arch import get_adapter

    try:
        adapter = get_adapter(model)
    except ValueError:
        return
    if adapter.name not in ADAPTERS:
        return
    if not heterogeneous:
        # a model loaded from a per-layer checkpoint and pruned to a plain one: the overrides are stale
        config.pop(PER_LAYER_CONFIG, None)
        config.pop(ALLOW_GLOBAL, None)
        return
    fields = adapter.fields["layers"]
    spec = structure.ArchSpec.from_dict(config[structure.HFPRUNE_CONFIG_KEY]["arch"]).stacks["layers"]
    (attention,), (ffn,) = spec.attention.values(), spec.ffn.values()
    overrides = {}
    width = len(str(len(structure.get_module(model.base_model, spec.layers)) - 1))
    for i, layer in enumerate(structure.get_module(model.base_model, spec.layers)):
        heads, kv_heads, _ = structure.attention_dims(layer, attention)
        neurons = structure.ffn_width(layer, ffn)
        entry, skip = {}, []
        if heads:
            entry.update({fields.heads: heads, fields.kv_heads: kv_heads})
        else:
            skip.append("attention")
        if neurons:
            entry[fields.ffn["ffn"]] = neurons
        else:
            skip.append("mlp")
        if skip:
            entry["skip"] = skip
        # transformers drops the overrides equal to the global value when it reads them
        overrides[str(i).zfill(width)] = entry
    config[PER_LAYER_CONFIG] = overrides
    config[ALLOW_GLOBAL] = True

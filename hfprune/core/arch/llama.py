"""Llama family (Llama, Mistral, Qwen2, Qwen3): grouped-query attention with explicit head_dim, SwiGLU FFN."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
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
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


# Which stock configs can give the attention ("heads") and FFN projections a bias: Mistral and Qwen2 hard-code
# bias=False on their output projections, Qwen3 has attention_bias only (checked in transformers 5.23).
_BIAS_FLAGS = {"llama": {"heads": "attention_bias", "ffn": "mlp_bias"}, "qwen3": {"heads": "attention_bias"}}


register(Adapter(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), spec=_spec,
    fields={"layers": StackFields(heads="num_attention_heads", kv_heads="num_key_value_heads",
                                  head_dim="head_dim", ffn={"ffn": "intermediate_size"})},
    bias_flags=lambda config: _BIAS_FLAGS.get(config.model_type, {}),
))

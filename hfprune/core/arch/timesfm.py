"""TimesFM: decoder-only stack with explicit head_dim; MLP gate_proj -> down_proj (ReLU, residual inside)."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    # TimesFmAttention.forward reshapes with (-1, head_dim) and scales the query per channel of head_dim
    # (`scaling` has head_dim entries, shared by all heads), so only head_dim matters and it never changes.
    # num_heads / q_size / kv_size are read only in __init__; they are synced to stay truthful.
    attention = AttentionSpec(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        module="self_attn", attrs={"num_heads": "heads", "q_size": "inner", "kv_size": "kv_inner"},
    )
    ffn = FfnSpec(up=("mlp.gate_proj",), down="mlp.down_proj")
    layers = StackSpec(layers="layers", attention={"heads": attention}, ffn={"ffn": ffn},
                       num_layers_field="num_hidden_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


# `intermediate_size` also sizes TimesFM's input and horizon residual blocks outside the layers, so a
# uniform FFN width is not expressible in its config; uniform heads are (explicit head_dim).
register(Adapter(name="timesfm", model_types=("timesfm",), spec=_spec,
                 fields={"layers": StackFields(heads="num_attention_heads", head_dim="head_dim")}))

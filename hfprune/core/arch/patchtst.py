"""PatchTST: encoder self-attention (q/k/v/out_proj) and a Sequential FFN (ff.0 -> ff.3)."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
        module="self_attn", attrs={"num_heads": "heads", "embed_dim": "inner"},
    )
    ffn = FfnSpec(up=("ff.0",), down="ff.3")
    layers = StackSpec(layers="encoder.layers", attention={"heads": attention}, ffn={"ffn": ffn},
                       num_layers_field="num_hidden_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


register(Adapter(name="patchtst", model_types=("patchtst",), spec=_spec,
                 fields={"layers": StackFields(ffn={"ffn": "ffn_dim"})}))

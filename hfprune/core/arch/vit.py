"""ViT (transformers 5 layout: q/k/v/o_proj in `attention`, fc1 -> fc2 in `mlp`)."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", o="attention.o_proj",
        module="attention", attrs={"num_attention_heads": "heads"},
    )
    ffn = FfnSpec(up=("mlp.fc1",), down="mlp.fc2")
    layers = StackSpec(layers="layers", attention={"heads": attention},
                       ffn={"ffn": ffn}, num_layers_field="num_hidden_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})



# ViT reads `getattr(config, "head_dim", hidden // heads)`, so an explicit head_dim makes uniform heads plain.
register(Adapter(name="vit", model_types=("vit",), spec=_spec,
                 fields={"layers": StackFields(heads="num_attention_heads", head_dim="head_dim",
                                               ffn={"ffn": "intermediate_size"})}))

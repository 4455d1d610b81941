"""DistilBERT: q/k/v/out linears inside one attention module; FFN lin1 -> lin2."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
        module="attention", head_dim_attr="attention_head_size", attrs={"n_heads": "heads"},
    )
    ffn = FfnSpec(up=("ffn.lin1",), down="ffn.lin2")
    layers = StackSpec(layers="transformer.layer", attention={"heads": attention}, ffn={"ffn": ffn},
                       num_layers_field="n_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


register(Adapter(name="distilbert", model_types=("distilbert",), spec=_spec,
                 fields={"layers": StackFields(ffn={"ffn": "hidden_dim"})}))

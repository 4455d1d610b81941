"""BERT layout (also RoBERTa, XLM-RoBERTa, ELECTRA): post-LN, attention output projection outside `self`."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
        module="attention.self", head_dim_attr="attention_head_size",
        attrs={"num_attention_heads": "heads", "all_head_size": "inner"},
        empty="context",  # `attention.output` (dense + LayerNorm(x + residual)) stays and adds the bias
    )
    ffn = FfnSpec(up=("intermediate.dense",), down="output.dense")
    layers = StackSpec(layers="encoder.layer", attention={"heads": attention}, ffn={"ffn": ffn},
                       num_layers_field="num_hidden_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


register(Adapter(
    name="bert", model_types=("bert", "roberta", "xlm-roberta", "electra"), spec=_spec,
    fields={"layers": StackFields(ffn={"ffn": "intermediate_size"})},
))

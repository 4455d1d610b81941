"""BERT layout (also RoBERTa, XLM-RoBERTa, ELECTRA): post-LN, attention output projection outside `self`."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, HiddenSpec, StackSpec
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
    prefix = _PREFIX.get(config.model_type)
    if prefix is None:  # ELECTRA: embeddings of their own size, projected up (not described here)
        return ArchSpec(model_type=config.model_type, stacks={"layers": layers})
    # BERT's sequence classifier reads the pooler's output, whose width stays; RoBERTa's head reads the stream
    seq = ("classifier.dense",) if prefix != "Bert" else ()
    heads = {f"{prefix}Model": (), f"{prefix}ForSequenceClassification": seq,
             f"{prefix}ForTokenClassification": ("classifier",), f"{prefix}ForQuestionAnswering": ("qa_outputs",)}
    hidden = HiddenSpec(embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings",
                                    "embeddings.token_type_embeddings"), norms=("embeddings.LayerNorm",),
                        layer_norms=("attention.output.LayerNorm", "output.LayerNorm"), readers=("pooler.dense",),
                        heads=heads)
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers}, hidden=hidden)


_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}


register(Adapter(
    name="bert", model_types=("bert", "roberta", "xlm-roberta", "electra"), spec=_spec,
    fields={"layers": StackFields(ffn={"ffn": "intermediate_size"})},
))

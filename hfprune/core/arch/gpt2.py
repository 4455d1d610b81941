"""GPT-2: fused Conv1D c_attn producing [q | k | v] (`split_size` follows), Conv1D MLP."""

from ..plan import PlanError
from ..structure import ArchSpec, AttentionSpec, FfnSpec, HiddenSpec, StackSpec
from .base import Adapter, StackFields, register


def _spec(config) -> ArchSpec:
    attention = AttentionSpec(
        q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj", module="attn", fused_qkv=True,
        attrs={"num_heads": "heads", "split_size": "inner", "embed_dim": "inner"},
        cache=True,
    )
    ffn = FfnSpec(up=("mlp.c_fc",), down="mlp.c_proj", module="mlp")  # Conv1D cannot run zero-width
    layers = StackSpec(layers="h", attention={"heads": attention}, ffn={"ffn": ffn}, num_layers_field="n_layer")
    heads = {"GPT2Model": (), "GPT2LMHeadModel": ("lm_head",), "GPT2ForSequenceClassification": ("score",),
             "GPT2ForTokenClassification": ("classifier",), "GPT2ForQuestionAnswering": ("qa_outputs",)}
    hidden = HiddenSpec(embeddings=("wte", "wpe"), norms=("ln_f",), layer_norms=("ln_1", "ln_2"), heads=heads)
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers}, hidden=hidden)


def _check(config, plan) -> None:
    if getattr(config, "add_cross_attention", False):
        raise PlanError("GPT-2 with add_cross_attention=True is not supported (its cross-attention has no adapter)")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and any(layer.drop for layer in plan.layers):
        raise PlanError(
            "layers[*].drop: GPT-2 with scale_attn_by_inverse_layer_idx=True scales attention by the layer's "
            "index, which a dropped layer would shift on reload; drop no layers for this model"
        )


register(Adapter(name="gpt2", model_types=("gpt2",), spec=_spec, check=_check,
                 fields={"layers": StackFields(ffn={"ffn": "n_inner"})}))

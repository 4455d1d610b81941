"""Mixture-of-experts decoders of transformers 5: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss.

Every MoE layer's routed experts are fused 3-D parameters (one matrix per expert) behind a router whose weight has
one row per expert; removing an expert is what setting its router logit to minus infinity does. Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE store ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), so neurons inside experts prune
too; gpt-oss stores them transposed with interleaved gate/up columns and biases: whole experts only. Qwen2-MoE's
shared expert is an ordinary FFN (``shared_ffn``). Attention heads prune as in Llama where the attention is
Llama's; OLMoE normalises q/k over all heads together and gpt-oss has a learned sink per head, so their heads are
not offered.
"""

from ..plan import PlanError
from ..structure import ArchSpec, AttentionSpec, ExpertsSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register

# model_type -> (config field of the expert count, of the neurons per expert (None: not prunable), heads prunable)
_FAMILIES = {
    "mixtral": ("num_local_experts", "intermediate_size", True),
    "qwen2_moe": ("num_experts", "moe_intermediate_size", True),
    "qwen3_moe": ("num_experts", "moe_intermediate_size", True),
    "olmoe": ("num_experts", "intermediate_size", False),
    "gpt_oss": ("num_local_experts", None, False),
}


def _spec(config) -> ArchSpec:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ValueError(f"{config.model_type} with dense MLP layers among the MoE ones (mlp_only_layers="
                         f"{config.mlp_only_layers!r}, decoder_sparse_step={config.decoder_sparse_step!r}) is not "
                         "supported; hfprune prunes MoE models whose every layer is sparse (mlp_only_layers=[], "
                         "decoder_sparse_step=1)")
    _, width_field, heads = _FAMILIES[config.model_type]
    attention = {}
    if heads:
        attention["heads"] = AttentionSpec(
            q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
            module="self_attn", attrs={"num_key_value_groups": "groups"}, cache=True)
    if config.model_type == "gpt_oss":
        experts = ExpertsSpec(router="mlp.router", experts="mlp.experts", layout=None, softmax="top_k",
                              renormalize=False)
    else:
        # Mixtral always renormalises its top-k weights; Qwen-MoE and OLMoE when norm_topk_prob is set
        experts = ExpertsSpec(router="mlp.gate", experts="mlp.experts",
                              renormalize=True if config.model_type == "mixtral" else "norm_topk_prob")
    ffn = {}
    if config.model_type == "qwen2_moe":
        ffn["shared_ffn"] = FfnSpec(up=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                    down="mlp.shared_expert.down_proj")
    layers = StackSpec(layers="layers", attention=attention, ffn=ffn, num_layers_field="num_hidden_layers",
                       per_layer_fields=("layer_types",), experts=experts)
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


def _check(config, plan) -> None:
    top_k = getattr(config, "num_experts_per_tok", 1)
    for i, layer in enumerate(plan.layers):
        keep = layer.get("experts")
        if keep is not None and len(keep) < top_k:
            raise PlanError(f"layers[{i}].experts keeps {len(keep)} expert(s), fewer than the router's top-k "
                            f"(num_experts_per_tok={top_k}); keep at least {top_k}")
        if layer.get("expert_ffn") is not None and config.model_type == "gpt_oss":
            raise PlanError(f"layers[{i}].expert_ffn: gpt-oss stores its experts transposed with interleaved gate/up "
                            "columns and biases; hfprune removes whole gpt-oss experts only (`experts`)")


def _fields(model_type: str) -> StackFields:
    count, width, heads = _FAMILIES[model_type]
    ffn = {"experts": count}
    if width is not None:
        ffn["expert_ffn"] = width  # per expert: the plan's unit count divided by the kept experts
    if model_type == "qwen2_moe":
        ffn["shared_ffn"] = "shared_expert_intermediate_size"
    if not heads:
        return StackFields(ffn=ffn)
    return StackFields(heads="num_attention_heads", kv_heads="num_key_value_heads", head_dim="head_dim", ffn=ffn)


for _model_type in _FAMILIES:
    register(Adapter(name=_model_type, model_types=(_model_type,), spec=_spec, check=_check,
                     fields={"layers": _fields(_model_type)}))

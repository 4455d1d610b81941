"""Tiny mixture-of-experts models (transformers 5 fused experts), with inputs, for the MoE tests.

Kept apart from ``CASES``: the parametrized suites there also run recovery steps (OBS, mask tuning, bias
compensation, LoRA) that do not prune routed experts; tests/test_registry.py counts both registries.
"""

from __future__ import annotations

import torch
import transformers as T

from .cases import Case, seeded

VOCAB = 99
MOE_CASES: dict = {}


def _text(seed: int, batch: int = 2, seq: int = 9) -> dict:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=seeded(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _moe(config_cls, model_cls, model_type, attn_implementations=("eager", "sdpa"), **extra):
    def build(attn=None):
        config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, **{"max_position_embeddings": 64, **extra})
        model = model_cls._from_config(config, attn_implementation=attn)
        with torch.no_grad():  # routers start at zero in some families: give them something to route by
            for name, param in model.named_parameters():
                if name.endswith(("gate.weight", "router.weight")):
                    param.normal_(0.0, 1.0, generator=seeded(len(name)))
        return model

    MOE_CASES[model_type] = Case(model_type, build, _text, attn_implementations=attn_implementations, generate=True)


_moe(T.MixtralConfig, T.MixtralForCausalLM, "mixtral", num_local_experts=6, intermediate_size=24,
     router_jitter_noise=0.0)
_moe(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, "qwen2_moe", num_experts=6, moe_intermediate_size=24,
     intermediate_size=40, shared_expert_intermediate_size=40, norm_topk_prob=False)
_moe(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, "qwen3_moe", num_experts=6, moe_intermediate_size=24,
     intermediate_size=40, norm_topk_prob=True)
_moe(T.OlmoeConfig, T.OlmoeForCausalLM, "olmoe", num_experts=6, intermediate_size=24, norm_topk_prob=False)
_moe(T.GptOssConfig, T.GptOssForCausalLM, "gpt_oss", attn_implementations=("eager",), num_local_experts=6,
     intermediate_size=24, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
     max_position_embeddings=131072)  # what its YaRN rope factor implies (else transformers warns)

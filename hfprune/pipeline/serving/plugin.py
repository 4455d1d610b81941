# Copyright hfprune contributors. Apache-2.0.
"""The vLLM plugin's entry point (``vllm.general_plugins``: ``hfprune = hfprune.pipeline.serving.plugin:register``).

Light on purpose: vLLM loads it in every process (API server, engine, its registry's inspection subprocess), so it
registers class *paths*; vLLM imports ``vllm_models`` only in the process that builds or inspects a model.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("hfprune")

MODELS_MODULE = "hfprune.pipeline.serving.vllm_models"
# Architectures whose per-layer hfprune checkpoints vllm_models builds (on vLLM's Llama decoder)
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# vLLM architectures of other families hfprune prunes: guarded, so that a per-layer checkpoint of one is refused
# with a clear message rather than failing on a shape deep in weight loading
GUARDED_ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForTokenClassification", "RobertaModel",
                         "RobertaForSequenceClassification", "XLMRobertaModel", "XLMRobertaForSequenceClassification",
                         "GPT2LMHeadModel", "GPT2ForSequenceClassification")
# architecture -> vLLM's own registry entry for it, kept before register() points the name at hfprune's class
STOCK_ENTRIES: dict = {}


def register() -> None:
    """Point the architectures above at hfprune's classes (each keeps vLLM's own class for any checkpoint that is
    not a per-layer hfprune one). Idempotent: vLLM may call it more than once per process."""
    from vllm import ModelRegistry

    for arch in LLAMA_ARCHITECTURES + GUARDED_ARCHITECTURES:
        entry = ModelRegistry.models.get(arch)
        if entry is None or arch in STOCK_ENTRIES:
            continue
        STOCK_ENTRIES[arch] = entry
        ModelRegistry.register_model(arch, f"{MODELS_MODULE}:Hfprune{arch}")
    logger.debug("hfprune: vLLM plugin registered for %s", sorted(STOCK_ENTRIES))

# Copyright hfprune contributors. Apache-2.0.
"""Serving hfprune checkpoints with vLLM (docs/serving.md).

Plain checkpoints (the same widths in every layer) are stock checkpoints: vLLM serves them as they are. Per-layer
checkpoints need this package's vLLM plugin, registered through vLLM's ``vllm.general_plugins`` entry point
(``pyproject.toml``), which vLLM calls in every process it starts: ``plugin.register`` makes vLLM's Llama, Mistral,
Qwen2 and Qwen3 architectures resolve to subclasses that build a per-layer hfprune checkpoint with each layer's
own sizes (``vllm_models.py``) and leave every other checkpoint to vLLM's own class.
``VLLM_PLUGINS`` (a comma-separated allow-list of plugin names) switches the plugin off when it names others only.

Nothing here imports vLLM at import time: ``layout`` (what to build, checked) needs only the core.
"""


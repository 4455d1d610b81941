# Copyright hfprune contributors. Apache-2.0.
"""Perplexity of a causal LM: token-weighted mean negative log-likelihood over a data set, then ``exp``.

Token-weighted (every predicted token counts once) rather than a mean of per-batch means, so the figure does
not depend on the batch size or on how padding falls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .core.apply import unwrap
from .pruning.importance.base import iterate, to_device

IGNORE_INDEX = -100


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Summed next-token NLL and the number of predicted tokens (pure).

    ``logits``: (B, T, V); ``labels``: (B, T), the input ids with ``-100`` where no loss is wanted. Position
    ``t`` predicts ``labels[:, t + 1]``, as in transformers' causal-LM loss.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)  # (B*(T-1),)
    total = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shift_labels != IGNORE_INDEX).sum())


def perplexity(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> dict:
    """``{"perplexity", "nll", "tokens"}`` of ``model`` on ``batches`` (dicts with ``input_ids`` and optionally
    ``attention_mask`` and ``labels``; without labels the inputs are the labels, padding excluded).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune.perplexity import perplexity
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> result = perplexity(model, [{"input_ids": torch.randint(0, 64, (2, 16))}])
    >>> result["tokens"]
    30
    ```
    """
    target = unwrap(model)
    device = next(target.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b, batch in enumerate(iterate(batches, "perplexity")):
                if max_batches is not None and b >= max_batches:
                    break
                batch = to_device(dict(batch), device)
                labels = batch.pop("labels", None)
                if labels is None:
                    labels = batch["input_ids"].clone()
                    if "attention_mask" in batch:
                        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
                logits = model(**batch, use_cache=False).logits
                s, n = nll_sum(logits, labels)
                total += float(s)
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate: the batches are empty or every label is -100")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}

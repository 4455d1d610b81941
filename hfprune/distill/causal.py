# Copyright hfprune contributors. Apache-2.0.
"""The causal-LM side of :class:`~hfprune.distill.trainer.DistillationTrainer`: which models shift, the checks
before training starts, and the logits term (full or top-k KL, live or precomputed teacher). Math in ``losses``."""

from __future__ import annotations

import torch

from ..core.apply import unwrap
from .config import DistillationConfig
from .logits_store import BATCH_KEYS, TeacherLogitsStore, vocab_size
from .losses import causal_token_mask, kl_distill_loss, logits_mse_loss, teacher_topk, topk_kl_distill_loss


def is_causal_lm(model) -> bool:
    """Whether ``model`` (unwrapped) is one of transformers' causal-LM classes (its loss shifts the labels).

    By class name, which hfprune's pruned subclasses keep; a user's own class is told with ``causal=True``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return type(model).__name__ in names


def check_setup(model, teacher, teacher_logits, cfg: DistillationConfig,
                train_dataset=None) -> TeacherLogitsStore | None:
    """Refuse a bad combination before the Trainer touches the model or the disk; returns the opened store."""
    if teacher is not None and teacher_logits is not None:
        raise ValueError("give either teacher= (a live teacher) or teacher_logits= (precomputed), not both")
    vocab = vocab_size(unwrap(model)) if model is not None else None
    if teacher_logits is None:
        if cfg.top_k is not None and vocab is not None and cfg.top_k > vocab:
            raise ValueError(f"top_k={cfg.top_k} is more than the model's vocabulary of {vocab}")
        return None
    causal = cfg.causal if cfg.causal is not None else model is None or is_causal_lm(unwrap(model))
    if not causal:
        raise ValueError(f"teacher_logits= is for causal LMs; {type(unwrap(model)).__name__} is not one (set "
                         "DistillationConfig(causal=True) if its loss shifts the labels)")
    store = TeacherLogitsStore(teacher_logits)
    if cfg.hidden_weight > 0:
        raise ValueError("hidden_weight > 0 needs a live teacher's hidden states; precomputed teacher logits hold "
                         "only the top-k logits")
    if cfg.alpha == 0:
        raise ValueError("teacher_logits= with alpha=0 trains on the task loss alone: drop teacher_logits")
    if cfg.top_k != store.top_k:
        raise ValueError(f"the teacher logits in {store.directory} hold the top-{store.top_k} tokens: set "
                         f"DistillationConfig(top_k={store.top_k}) (got top_k={cfg.top_k})")
    if abs(cfg.temperature - store.temperature) > 1e-12:
        raise ValueError(f"the teacher logits in {store.directory} were written at temperature {store.temperature} "
                         f"(their logsumexp depends on it); got temperature={cfg.temperature}")
    if vocab is not None and vocab != store.vocab_size:
        raise ValueError(f"the teacher logits in {store.directory} are over a vocabulary of {store.vocab_size}; the "
                         f"model's is {vocab}")
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) != len(store):
        raise ValueError(f"the training dataset has {len(train_dataset)} rows but the precomputed teacher logits in "
                         f"{store.directory} have {len(store)}: precompute them on this dataset")
    return store


def split_teacher_batch(inputs: dict) -> tuple:
    """``(model inputs, precomputed teacher tensors or None)``."""
    if not any(k in inputs for k in BATCH_KEYS):
        return inputs, None
    return {k: v for k, v in inputs.items() if k not in BATCH_KEYS}, tuple(inputs[k] for k in BATCH_KEYS)


def causal_logits_term(logits: torch.Tensor, t_out, precomputed, inputs: dict, cfg: DistillationConfig,
                       num_items) -> torch.Tensor:
    """The logits term of a causal LM over the shifted token items (see :func:`~.losses.causal_token_mask`).

    ``t_out``: the live teacher's output (or ``None``); ``precomputed``: ``(values, indices, lse)`` (B, T, ...) from
    :class:`~.logits_store.TeacherLogitsCollator` (or ``None``)."""
    mask = causal_token_mask(inputs.get("attention_mask"), inputs.get("labels"), logits.shape[:2])
    student = logits[:, :-1]  # (B, T-1, V): position t predicts token t + 1
    if precomputed is not None:
        values, indices, lse = (x[:, :-1].to(logits.device) for x in precomputed)
        return topk_kl_distill_loss(student, values, indices, lse, cfg.temperature, mask, num_items)
    t_logits = t_out.logits[:, :-1].to(logits.device)
    if cfg.loss == "mse":
        return logits_mse_loss(student, t_logits, mask, num_items)
    if cfg.top_k is not None:
        values, indices, lse = teacher_topk(t_logits, cfg.top_k, cfg.temperature)
        return topk_kl_distill_loss(student, values, indices, lse, cfg.temperature, mask, num_items)
    return kl_distill_loss(student, t_logits, cfg.temperature, mask, num_items)


def causal_token_count(batch: dict) -> float:
    """Items of one micro-batch of a causal LM (its shifted token mask), for the step's normaliser."""
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    ref = ids if ids is not None else mask
    if ref is None:
        return -1.0
    return float(causal_token_mask(mask, batch.get("labels"), ref.shape[:2]).sum())

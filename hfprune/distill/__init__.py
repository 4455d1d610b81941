# Copyright hfprune contributors. Apache-2.0.
"""Knowledge distillation for pruning: pure losses, a config, a Trainer subclass, and precomputed teacher logits."""

from .config import DistillationConfig
from .logits_store import TeacherLogitsStore, precompute_teacher_logits
from .losses import (
    causal_token_mask,
    hidden_mse_loss,
    kl_distill_loss,
    logits_mse_loss,
    prediction_mse_loss,
    teacher_topk,
    topk_kl_distill_loss,
)
from .trainer import DistillationTrainer

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "TeacherLogitsStore",
    "causal_token_mask",
    "hidden_mse_loss",
    "kl_distill_loss",
    "logits_mse_loss",
    "precompute_teacher_logits",
    "prediction_mse_loss",
    "teacher_topk",
    "topk_kl_distill_loss",
]

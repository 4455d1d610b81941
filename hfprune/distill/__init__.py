# Copyright hfprune contributors. Apache-2.0.
"""Knowledge distillation for pruning: pure losses, a config, and a Trainer subclass."""

from .config import DistillationConfig
from .losses import hidden_mse_loss, kl_distill_loss, logits_mse_loss, prediction_mse_loss
from .trainer import DistillationTrainer

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "hidden_mse_loss",
    "kl_distill_loss",
    "logits_mse_loss",
    "prediction_mse_loss",
]

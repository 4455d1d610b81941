# Copyright hfprune contributors. Apache-2.0.
"""``DistillationConfig``: how a student learns from a teacher while it is pruned."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

LOSSES = ("kl", "mse")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class DistillationConfig:
    """Weights and settings of the distillation loss.

    ``loss = alpha * logits_term + (1 - alpha) * task_loss + hidden_weight * hidden_term``. The logits term is
    ``T^2 * KL(teacher_T || student_T)`` per example (per non-padding token for token-level heads) for ``"kl"``,
    or the squared error of the logits for ``"mse"``; regression heads (``problem_type="regression"`` or one
    output) always use the squared error to the teacher's prediction, and forecasting models (outputs without
    ``logits``) use ``hfprune.forecast.forecast_distill_loss``.

    Example:

    ```python
    >>> from hfprune.distill import DistillationConfig
    >>> DistillationConfig(temperature=2.0, alpha=0.9, hidden_weight=1.0, layer_map={2: 4}).layer_map
    {2: 4}
    ```
    """

    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KL term (> 0)"})
    alpha: float = field(default=0.5, metadata={
        "help": "weight of the distillation term; the task loss gets 1 - alpha (0: task loss only)"})
    hidden_weight: float = field(default=0.0, metadata={
        "help": "weight of the hidden-state MSE term (0: off)"})
    layer_map: dict | None = field(default=None, metadata={
        "help": "student -> teacher hidden_states index (0 is the embeddings); None: every student layer to the "
                "teacher layer at the same relative depth"})
    loss: str = field(default="kl", metadata={"help": f"logits term, one of {LOSSES}"})
    teacher_dtype: str | None = field(default=None, metadata={
        "help": f"cast the teacher to this dtype, one of {DTYPES} (None: keep its dtype)"})
    teacher_device: str | None = field(default=None, metadata={
        "help": "run the teacher on this device, e.g. 'cpu' or 'cuda:1' (None: the training device)"})

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha!r} must be in [0, 1]")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight={self.hidden_weight!r} must be >= 0")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {LOSSES}")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}; choose one of {DTYPES} or None")
        if self.layer_map is not None:
            if not isinstance(self.layer_map, dict) or not self.layer_map:
                raise ValueError(f"layer_map={self.layer_map!r} must be a non-empty dict student -> teacher index")
            try:  # JSON/YAML give string keys
                self.layer_map = {int(k): int(v) for k, v in self.layer_map.items()}
            except (TypeError, ValueError):
                raise ValueError(f"layer_map={self.layer_map!r} must map int to int") from None
            if any(k < 0 or v < 0 for k, v in self.layer_map.items()):
                raise ValueError(f"layer_map={self.layer_map!r} has a negative index")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

# Copyright hfprune contributors. Apache-2.0.
"""``DistillationConfig``: how a student learns from a teacher while it is pruned."""

from __future__ import annotations

import math
import numbers
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
    ``logits``) use ``hfprune.forecast.forecast_distill_loss``. With ``top_k``, the KL is over the teacher's top-k
    tokens plus one bucket for the rest of the vocabulary (``hfprune.distill.losses.topk_kl_per_item``). Causal LMs
    count the positions that predict a real token (shifted like their loss, ``labels == -100`` left out).

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
    top_k: int | None = field(default=None, metadata={
        "help": "KL over the teacher's top-k tokens plus one bucket for the rest of the vocabulary (a positive "
                "int <= the vocabulary size; needs loss='kl'); None: the full vocabulary. Required with "
                "precomputed teacher logits, and equal to the top-k they were written with"})
    causal: bool | None = field(default=None, metadata={
        "help": "token items of a causal LM: logits shifted like its loss (position t predicts token t + 1, the "
                "last position and tokens whose label is -100 do not count); None: detect from the model "
                "class (a ...ForCausalLM / ...LMHeadModel of transformers' causal-LM auto mapping)"})
    teacher_dtype: str | None = field(default=None, metadata={
        "help": f"cast the teacher to this dtype, one of {DTYPES} (None: keep its dtype)"})
    teacher_device: str | None = field(default=None, metadata={
        "help": "run the teacher on this device, e.g. 'cpu' or 'cuda:1' (None: the training device)"})

    def __post_init__(self):
        for name, allowed, ok in (("temperature", "a finite number > 0", lambda v: v > 0),
                                  ("alpha", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
                                  ("hidden_weight", "a finite number >= 0", lambda v: v >= 0)):
            value = getattr(self, name)
            # True is 1 and "0.5" fails later with an unrelated TypeError; inf and nan poison the loss
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{name}={value!r} must be {allowed}")
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {LOSSES}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 1:
                raise ValueError(f"top_k={self.top_k!r} must be a positive int (at most the vocabulary size) or "
                                 "None for the full vocabulary")
            self.top_k = int(self.top_k)
            if self.loss != "kl":
                raise ValueError(f"top_k={self.top_k} needs loss='kl', got loss={self.loss!r}: the top-k term is a "
                                 "KL over the teacher's top-k tokens and a remainder bucket")
        if self.causal is not None and not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be True, False or None (detect from the model)")
        if self.teacher_dtype is not None and (not isinstance(self.teacher_dtype, str)
                                               or self.teacher_dtype not in DTYPES):
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}; choose one of {DTYPES} or None")
        if self.teacher_device is not None:
            import torch

            try:
                if not isinstance(self.teacher_device, str):
                    raise TypeError
                torch.device(self.teacher_device)
            except (TypeError, RuntimeError):
                raise ValueError(f"teacher_device={self.teacher_device!r} is not a device name like 'cpu', 'cuda' "
                                 "or 'cuda:1'") from None
        if self.layer_map is not None:
            if not isinstance(self.layer_map, dict) or not self.layer_map:
                raise ValueError(f"layer_map={self.layer_map!r} must be a non-empty dict student -> teacher index")
            parsed = {_index(k): _index(v) for k, v in self.layer_map.items()}  # JSON/YAML give string keys
            if None in parsed or None in parsed.values():
                raise ValueError(f"layer_map={self.layer_map!r} must map int to int")
            if any(k < 0 or v < 0 for k, v in parsed.items()):
                raise ValueError(f"layer_map={self.layer_map!r} has a negative index")
            self.layer_map = parsed

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _index(value) -> int | None:
    """A hidden-state index from an int or its string form (JSON keys); ``None`` for anything else (1.5, True)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None

# Copyright hfprune contributors. Apache-2.0.
"""Pieces the benchmark scripts share (they run as ``python benchmarks/<name>.py``, so this imports as ``common``)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class TimeLimit(TrainerCallback):
    """Stop training once ``seconds`` of wall time have passed since training began (a time budget)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True

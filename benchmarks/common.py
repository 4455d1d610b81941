# Copyright hfprune contributors. Apache-2.0.
"""Pieces the benchmark scripts share (they run as ``python benchmarks/<name>.py``, so this imports as ``common``)."""

from __future__ import annotations

import time

from transformers import TrainerCallback

CLOCKS = {
    # wall time: what a user waits; varies with the machine's load
    "wall": time.perf_counter,
    # CPU time of this process, all its threads together: the compute spent, about the same on a loaded shared
    # machine as on an idle one (so every row of a comparison gets the same budget)
    "cpu": time.process_time,
}


class TimeLimit(TrainerCallback):
    """Stop training once ``seconds`` have passed since training began (a time budget), measured by ``clock``:
    ``"wall"`` (the default, wall-clock time) or ``"cpu"`` (CPU time of the process, summed over its threads)."""

    def __init__(self, seconds: float, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"TimeLimit clock {clock!r} is not one of {sorted(CLOCKS)}")
        self.seconds, self.clock, self.now, self.start = seconds, clock, CLOCKS[clock], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.now()

    def elapsed(self) -> float:
        return 0.0 if self.start is None else self.now() - self.start

    def on_step_end(self, args, state, control, **kwargs):
        if self.elapsed() > self.seconds:
            control.should_training_stop = True

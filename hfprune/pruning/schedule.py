# Copyright hfprune contributors. Apache-2.0.
"""Pruning schedules: when to prune during training, and how far. Pure functions of the optimizer step.

A schedule gives, at every optimizer step, the *fraction of the final removal* reached so far: 0 means dense,
1 means the config's budget. :func:`budget_at` turns that fraction into a :class:`~hfprune.PruningConfig` with a
proportionally looser budget (for ``macs_ratio=0.33`` at fraction 0.5: ``macs_ratio=0.665``).

- ``oneshot``: everything at ``start_step``.
- ``iterative``: ``rounds`` equal steps, at ``start + k * (end - start) / rounds`` for ``k = 1..rounds``
  (prune, train, prune again, ...).
- ``gradual``: the cubic schedule of Zhu & Gupta (2017), ``s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3)``,
  updated every ``every`` steps from ``start_step`` and reaching the budget at ``end_step``: fast removal
  while the network has redundancy, slow toward the end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

KINDS = ("oneshot", "iterative", "gradual")
# When end_step is not given, gradual/iterative schedules finish at this fraction of the run's max_steps, leaving
# the rest for recovery at the final sparsity.
DEFAULT_END_FRACTION = 2 / 3
DEFAULT_GRADUAL_UPDATES = 10


@dataclass
class ScheduleConfig:
    """When to prune during training.

    Example:

    ```python
    >>> from hfprune.pruning.schedule import ScheduleConfig, fraction_at, prune_steps
    >>> s = ScheduleConfig(kind="gradual", start_step=0, end_step=100, every=25)
    >>> prune_steps(s)
    [25, 50, 75, 100]
    >>> [round(fraction_at(s, t), 3) for t in (0, 24, 25, 60, 100, 500)]
    [0.0, 0.0, 0.578, 0.875, 1.0, 1.0]
    >>> prune_steps(ScheduleConfig(kind="iterative", start_step=10, end_step=40, rounds=3))
    [20, 30, 40]
    ```
    """

    kind: str = field(default="gradual", metadata={"help": f"one of {KINDS}"})
    start_step: int = field(default=0, metadata={
        "help": "oneshot: the step that prunes; iterative/gradual: the step the schedule starts from"})
    end_step: int | None = field(default=None, metadata={
        "help": "iterative/gradual: the step that reaches the budget (None: 2/3 of the run's max_steps)"})
    rounds: int = field(default=3, metadata={"help": "iterative: number of prune rounds"})
    every: int | None = field(default=None, metadata={
        "help": "gradual: steps between mask updates (None: 10 updates between start_step and end_step)"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a schedule; choose one of {KINDS}")
        for name in ("start_step", "end_step", "rounds", "every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name}={value!r} must be an int")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0")
        if self.kind != "oneshot" and self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step={self.end_step} must be > start_step={self.start_step} for a {self.kind} "
                             "schedule")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be >= 1")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")

    @property
    def resolved(self) -> bool:
        return self.kind == "oneshot" or self.end_step is not None

    def resolve(self, max_steps: int) -> ScheduleConfig:
        """This schedule with ``end_step`` fixed for a run of ``max_steps`` optimizer steps."""
        if self.resolved:
            return self
        end = max(self.start_step + 1, int(DEFAULT_END_FRACTION * max_steps))
        return dataclasses.replace(self, end_step=end)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        if not isinstance(d, dict):
            raise TypeError(f"a schedule is a dict of {[f.name for f in fields(cls)]}, got {d!r}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**d)


def _require_resolved(schedule: ScheduleConfig) -> None:
    if not schedule.resolved:
        raise ValueError(f"the {schedule.kind} schedule has no end_step; call schedule.resolve(max_steps) first")


def gradual_every(schedule: ScheduleConfig) -> int:
    """Steps between two gradual updates."""
    _require_resolved(schedule)
    if schedule.every is not None:
        return schedule.every
    return max(1, math.ceil((schedule.end_step - schedule.start_step) / DEFAULT_GRADUAL_UPDATES))


def prune_steps(schedule: ScheduleConfig) -> list:
    """The optimizer steps at which the masks change (sorted). A step ``t`` means "after ``t`` optimizer steps"."""
    _require_resolved(schedule)
    s = schedule
    if s.kind == "oneshot":
        return [s.start_step]
    span = s.end_step - s.start_step
    if s.kind == "iterative":
        return sorted({s.start_step + math.ceil(k * span / s.rounds) for k in range(1, s.rounds + 1)})
    every = gradual_every(s)
    steps = list(range(s.start_step + every, s.end_step, every))
    return steps + [s.end_step]


def cubic_fraction(step: int, start: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp from 0 at ``start`` to 1 at ``end`` (clamped outside)."""
    if end <= start:
        raise ValueError(f"end={end} must be > start={start}")
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return 1.0 - (1.0 - progress) ** 3


def fraction_at(schedule: ScheduleConfig, step: int) -> float:
    """Fraction of the final removal in force after ``step`` optimizer steps (piecewise constant: it changes
    only at :func:`prune_steps`)."""
    _require_resolved(schedule)
    s = schedule
    done = [t for t in prune_steps(s) if t <= step]
    if not done:
        return 0.0
    last = done[-1]
    if s.kind == "oneshot":
        return 1.0
    if s.kind == "iterative":
        return len(done) / len(prune_steps(s))
    return cubic_fraction(last, s.start_step, s.end_step)


BUDGETS = ("macs_ratio", "params_ratio", "latency_ratio", "head_ratio", "ffn_ratio", "expert_ratio")


def budget_at(config, fraction: float):
    """``config`` with each keep ratio ``r`` loosened to ``1 - fraction * (1 - r)`` (fraction 1: the budget)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1]")
    changes = {name: 1.0 - fraction * (1.0 - getattr(config, name))
               for name in BUDGETS if getattr(config, name, None) is not None}
    return dataclasses.replace(config, **changes)

# Copyright hfprune contributors. Apache-2.0.
"""``SearchConfig``: the budget, the axes searched and how candidates are scored; validated before any model loads."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

AXES = ("depth", "hidden", "heads", "ffn", "experts")
# the axis solved for the budget (largest keep that meets it), first one searched that the model has; the others
# come from their grids
SOLVE_ORDER = ("ffn", "experts", "heads", "hidden", "depth")
BUDGETS = ("params", "macs", "memory", "latency")
METRICS = ("perplexity",)
RECOVERY = ("none", "obs")
DEFAULT_GRID = {"depth": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75), "hidden": (1.0, 0.9, 0.8),
                "heads": (1.0, 0.67, 0.34), "ffn": (1.0, 0.8, 0.6), "experts": (1.0, 0.75, 0.5)}


@dataclass
class SearchConfig:
    """A shape search under one budget: enumerate uniform shapes (layers dropped by block influence, hidden size,
    key/value groups, FFN width, experts) that meet it, score each retraining-free on a few held-out blocks, keep the
    best. Every candidate keeps the same structure in every layer, so a Llama-family result is a plain checkpoint.

    ``budget`` is a fraction of the dense model's: ``params`` (all parameters), ``macs`` (the transformer layers' MACs
    at ``seq_len``), ``memory`` (weight bytes plus the KV cache of ``kv_batch`` sequences of ``context`` tokens, at
    the model's dtype) or ``latency`` (the layers' latency measured on this device: ``hfprune.pruning.latency``; not
    with the ``hidden`` axis, which that table does not model). ``axes``: what may shrink; the first of
    ``ffn, experts, heads, hidden, depth`` among them is solved for the budget (its largest size that meets it), the
    others take the kept fractions in ``grid``. The per-axis importance scores and each candidate's score are cached
    under ``cache_dir`` keyed by model, data and settings, so a new budget reuses them.

    Example:

    ```python
    >>> from hfprune.pruning.search import SearchConfig
    >>> SearchConfig(budget="params", ratio=0.8, axes=("depth", "heads", "ffn")).solve_axis(("heads", "ffn"))
    'ffn'
    ```
    """

    ratio: float = field(default=0.8, metadata={"help": "keep this fraction of the dense model's budget quantity"})
    budget: str = field(default="params", metadata={"help": f"what the ratio is of, one of {BUDGETS}"})
    axes: tuple = field(default=("depth", "hidden", "heads", "ffn"), metadata={
        "help": f"axes that may shrink, from {AXES}; an axis the model lacks is skipped"})
    grid: dict = field(default_factory=dict, metadata={
        "help": "kept fractions per gridded axis, e.g. {'depth': [1, 0.9]}; missing axes use DEFAULT_GRID"})
    criterion: str = field(default="activation", metadata={"help": "scores heads and FFN neurons (see PruningConfig)"})
    hidden_criterion: str = field(default="activation", metadata={"help": "scores hidden channels"})
    expert_criterion: str = field(default="reap", metadata={"help": "scores routed experts (reap or frequency)"})
    metric: str = field(default="perplexity", metadata={"help": f"candidate score, one of {METRICS} (lower wins)"})
    eval_examples: int = field(default=8, metadata={
        "help": "held-out examples each candidate is scored on (the last ones of the calibration data unless eval "
                "data is given)"})
    per_layer: bool = field(default=False, metadata={
        "help": "also build per-layer candidates: FFN width and key/value groups chosen per layer by a knapsack over "
                "each layer's measured sensitivity (remote-code checkpoints; hfprune.pruning.search.per_layer)"})
    layer_ladder: tuple = field(default=(0.875, 0.75, 0.625, 0.5, 0.375, 0.25), metadata={
        "help": "per-layer candidates: the FFN fractions a layer may keep (each layer's sensitivity is measured at "
                "every one)"})
    recovery: str = field(default="none", metadata={
        "help": f"one of {RECOVERY}: obs reconstructs the finalists' output projections (structured OBS) "
                "on the calibration data before they are scored again"})
    finalists: int = field(default=1, metadata={"help": "best candidates that get the recovery and are re-scored"})
    finalist_per_kind: bool = field(default=True, metadata={
        "help": "with a recovery, also recover the best candidate of every kind of shape (the set of axes it "
                "shrinks): OBS repairs heads and FFN neurons far more than dropped layers or hidden channels, so "
                "the unrecovered ranking would hide the kinds it helps most"})
    recovery_examples: int = field(default=128, metadata={"help": "calibration examples the recovery uses"})
    seq_len: int = field(default=128, metadata={"help": "sequence length of the MACs and latency budgets"})
    context: int = field(default=4096, metadata={"help": "memory budget: KV cache tokens per sequence"})
    kv_batch: int = field(default=1, metadata={"help": "memory budget: sequences in the KV cache"})
    round_to: int = field(default=8, metadata={"help": "FFN width in multiples of this"})
    min_layers: int = field(default=1, metadata={"help": "layers every candidate keeps at least"})
    seed: int = field(default=0)
    cache_dir: str | None = field(default=None, metadata={
        "help": "where scores and candidate evaluations are cached (None: no cache)"})

    def __post_init__(self):
        for name, choices in (("budget", BUDGETS), ("metric", METRICS), ("recovery", RECOVERY)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {choices}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio!r} must be a number in (0, 1]")
        self.ratio = float(self.ratio)
        axes = self.axes.split(",") if isinstance(self.axes, str) else self.axes
        if not isinstance(axes, (list, tuple)) or not axes:
            raise ValueError(f"axes={self.axes!r}: give a non-empty list from {AXES}")
        axes = tuple(a.strip() if isinstance(a, str) else a for a in axes)
        bad = [a for a in axes if a not in AXES]
        if bad or len(set(axes)) != len(axes):
            what = f"{bad[0]!r} is not an axis" if bad else "names an axis twice"
            raise ValueError(f"axes={self.axes!r}: {what}; choose from {AXES}")
        self.axes = axes
        if self.budget == "latency" and "hidden" in axes:
            raise ValueError("budget='latency' with the 'hidden' axis: the latency table times each block at the dense "
                             "hidden size and cannot predict a narrower one; drop 'hidden' from axes or use params, "
                             "macs or memory")
        if not isinstance(self.grid, dict):
            raise ValueError(f"grid={self.grid!r} must be a dict {{axis: [kept fractions]}}")
        grid = {}
        for axis, values in self.grid.items():
            if axis not in AXES:
                raise ValueError(f"grid: {axis!r} is not an axis; choose from {AXES}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"grid[{axis!r}]={values!r} must be a non-empty list of kept fractions in (0, 1]")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1 or math.isnan(v):
                    raise ValueError(f"grid[{axis!r}]: {v!r} is not a kept fraction in (0, 1]")
            grid[axis] = tuple(sorted({float(v) for v in values}, reverse=True))
        self.grid = grid
        ladder = self.layer_ladder
        if not isinstance(ladder, (list, tuple)) or not ladder or any(
                isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1 for v in ladder):
            raise ValueError(f"layer_ladder={ladder!r} must be a non-empty list of FFN fractions in (0, 1)")
        self.layer_ladder = tuple(sorted({float(v) for v in ladder}, reverse=True))
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"per_layer={self.per_layer!r} must be True or False")
        from ..importance import supported_importance
        from ..importance.hidden import HIDDEN_CRITERIA

        for name, choices in (("criterion", supported_importance()), ("hidden_criterion", HIDDEN_CRITERIA),
                              ("expert_criterion", ("reap", "frequency"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one of {tuple(choices)}")
        for name, minimum in (("eval_examples", 1), ("finalists", 1), ("recovery_examples", 1), ("seq_len", 1),
                              ("context", 1), ("kv_batch", 1), ("round_to", 1), ("min_layers", 1), ("seed", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
                    minimum is not None and value < minimum):
                raise ValueError(f"{name}={value!r} must be an int" + (f" >= {minimum}" if minimum else ""))

    @classmethod
    def from_pruning(cls, config, **overrides) -> SearchConfig:
        """The search a ``PruningConfig(scope="search")`` asks for: its budget, criterion, seq_len, seed and
        recovery (``obs`` or none), the other settings at their defaults (or ``overrides``)."""
        kind = config.budget_kind
        values = {"budget": kind, "ratio": getattr(config, f"{kind}_ratio"), "criterion": config.criterion,
                  "seq_len": config.seq_len, "seed": config.seed, "round_to": config.round_to,
                  "recovery": "obs" if config.recovery == "obs" else "none"}
        if config.recovery_examples is not None:
            values["recovery_examples"] = config.recovery_examples
        if kind == "latency":  # the latency table cannot predict a narrower hidden size
            values["axes"] = ("depth", "heads", "ffn", "experts")
        return cls(**{**values, **overrides})

    def solve_axis(self, present: tuple) -> str | None:
        """The axis solved for the budget among the searched axes the model has (``present``)."""
        return next((a for a in SOLVE_ORDER if a in self.axes and a in present), None)

    def grid_for(self, axis: str) -> tuple:
        return self.grid.get(axis, DEFAULT_GRID[axis])

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["axes"] = list(self.axes)
        out["grid"] = {k: list(v) for k, v in self.grid.items()}
        out["layer_ladder"] = list(self.layer_ladder)
        return out

# Copyright hfprune contributors. Apache-2.0.
"""``SparsityConfig``: which single weights to zero, by what score, in what pattern (``hfprune.sparsify``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .patterns import Pattern, parse_pattern

CRITERIA = ("magnitude", "wanda", "sparsegpt", "movement", "random")
DATA_CRITERIA = ("wanda", "sparsegpt", "movement")  # need calibration batches (movement: with labels)
RATIOS = ("uniform", "owl")
TARGETS = ("blocks", "blocks+head")


@dataclass
class SparsityConfig:
    """Weight-level (unstructured, N:M or block) sparsity of a model's attention and FFN projections.

    Example:

    ```python
    >>> from hfprune.pruning.sparsity import SparsityConfig
    >>> SparsityConfig(criterion="wanda", pattern="2:4").resolved_sparsity
    0.5
    >>> SparsityConfig(criterion="magnitude", sparsity=0.7).pattern
    'unstructured'
    ```
    """

    criterion: str = field(default="magnitude", metadata={"help": f"one of {CRITERIA}"})
    sparsity: float | None = field(default=None, metadata={
        "help": "fraction of each target weight set to zero (default 0.5; N:M patterns imply 1 - N/M)"})
    pattern: str = field(default="unstructured", metadata={
        "help": "unstructured, N:M (keep N of every M consecutive inputs, e.g. 2:4) or block:RxC (R x C tiles)"})
    ratios: str = field(default="uniform", metadata={
        "help": "per-layer sparsity: uniform, or owl (outlier-weighted layer ratios, Yin et al. 2024)"})
    targets: str = field(default="blocks", metadata={
        "help": f"one of {TARGETS}: the attention and FFN projections of every layer, optionally the LM/task head "
                "(embeddings are never sparsified)"})
    owl_lambda: float = field(default=0.08, metadata={"help": "owl: largest deviation from the mean sparsity"})
    owl_threshold: float = field(default=5.0, metadata={
        "help": "owl: a weight is an outlier when its Wanda score exceeds this many times the layer's mean"})
    block_size: int = field(default=128, metadata={"help": "sparsegpt: columns updated together"})
    damp: float = field(default=0.01, metadata={"help": "sparsegpt: Hessian damping, relative to its mean diagonal"})
    seed: int = field(default=0, metadata={"help": "random: the seed of the scores"})
    max_examples: int | None = field(default=None, metadata={"help": "calibration examples used (None: all)"})
    calibration_batch_size: int = field(default=8, metadata={"help": "rows per batch of a calibration Dataset"})

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not a sparsity criterion; choose one of {CRITERIA}")
        if self.ratios not in RATIOS:
            raise ValueError(f"ratios={self.ratios!r}; choose one of {RATIOS}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets={self.targets!r}; choose one of {TARGETS}")
        pattern = parse_pattern(self.pattern)  # raises, naming the pattern and the allowed forms
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                    or not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity={self.sparsity!r} must be a number in [0, 1)")
            if pattern.kind == "n:m" and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise ValueError(f"pattern={self.pattern!r} keeps {pattern.n} of every {pattern.m} weights, so "
                                 f"sparsity is {pattern.sparsity:g}, not {self.sparsity!r}; leave sparsity unset")
        if pattern.kind == "n:m" and self.ratios != "uniform":
            raise ValueError(f"ratios={self.ratios!r} varies the sparsity per layer, but pattern={self.pattern!r} "
                             "fixes it; use ratios='uniform'")
        for name in ("block_size", "calibration_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda={self.owl_lambda!r} must be in [0, 0.5)")
        if self.owl_threshold <= 0 or self.damp < 0:
            raise ValueError(f"owl_threshold={self.owl_threshold!r} must be > 0 and damp={self.damp!r} >= 0")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples={self.max_examples!r} must be >= 1 or None")

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def resolved_sparsity(self) -> float:
        pattern = self.parsed_pattern
        if pattern.kind == "n:m":
            return pattern.sparsity
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def needs_data(self) -> bool:
        return self.criterion in DATA_CRITERIA or self.ratios == "owl"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> SparsityConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SparsityConfig keys {sorted(unknown)}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**d)

# Copyright hfprune contributors. Apache-2.0.
"""User-facing configuration: dataclasses with help metadata, validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

SCOPES = ("global", "per_layer")
NORMALIZE = ("auto", "none", "layer")


@dataclass
class PruningConfig:
    """How to prune: a criterion, one budget, and constraints.

    Exactly one budget: ``macs_ratio`` or ``params_ratio`` (fractions of the dense transformer layers' MACs /
    of the model's parameters to keep), or ``head_ratio`` and/or ``ffn_ratio`` (fractions of heads / neurons
    to keep).

    Example:

    ```python
    >>> from hfprune import PruningConfig
    >>> PruningConfig(criterion="fisher", macs_ratio=0.6).scope
    'global'
    >>> PruningConfig(criterion="magnitude", head_ratio=0.5, ffn_ratio=0.5, scope="per_layer").ffn_ratio
    0.5
    ```
    """

    criterion: str = field(default="fisher", metadata={"help": "importance criterion: see supported_importance()"})
    macs_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of the layers' MACs"})
    params_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of all parameters"})
    head_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of attention heads"})
    ffn_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of FFN neurons"})
    seq_len: int = field(default=128, metadata={"help": "sequence length at which MACs are counted"})
    scope: str = field(default="global", metadata={"help": f"ranking scope, one of {SCOPES}"})
    normalize: str = field(default="auto", metadata={
        "help": f"score normalisation across layers, one of {NORMALIZE}; auto: per layer for magnitude and "
                "activation, none for gradient criteria (their scores already share a scale)"})
    min_heads: int = field(default=0, metadata={
        "help": "heads kept in every layer at least (0: a layer may lose its attention)"})
    round_to: int = field(default=1, metadata={"help": "keep FFN neurons in multiples of this (e.g. 8)"})
    seed: int = field(default=0, metadata={"help": "seed for the random criterion"})

    def __post_init__(self):
        from .importance import supported_importance

        if self.criterion not in supported_importance():
            raise ValueError(f"criterion={self.criterion!r} is not supported; choose one of {supported_importance()}")
        budgets = {n: getattr(self, n) for n in ("macs_ratio", "params_ratio", "head_ratio", "ffn_ratio")}
        for name, value in budgets.items():
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in (0, 1]")
        given = [n for n, v in budgets.items() if v is not None]
        kinds = {"macs" if n == "macs_ratio" else "params" if n == "params_ratio" else "ratio" for n in given}
        if len(kinds) != 1:
            raise ValueError(
                f"give exactly one budget: macs_ratio, params_ratio, or head_ratio/ffn_ratio; got {given or 'none'}"
            )
        if kinds == {"ratio"} and self.scope == "global":
            self.scope = "per_layer"  # keep ratios are a per-layer notion
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}; choose one of {SCOPES}")
        if self.scope == "per_layer" and kinds != {"ratio"}:
            raise ValueError(
                "scope='per_layer' works with head_ratio/ffn_ratio; MACs and parameter budgets rank globally"
            )
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r}; choose one of {NORMALIZE}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 1")
        if self.min_heads < 0:
            raise ValueError(f"min_heads={self.min_heads} must be >= 0")
        if self.round_to < 1:
            raise ValueError(f"round_to={self.round_to} must be >= 1")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

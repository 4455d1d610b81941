# Copyright hfprune contributors. Apache-2.0.
"""User-facing configuration: dataclasses with help metadata, validated in ``__post_init__``."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .importance import Importance

SCOPES = ("global", "per_layer", "uniform", "search")
TARGETS = ("blocks", "hidden")
NORMALIZE = ("auto", "none", "layer")
RECOVERY = ("auto", "none", "rearrange", "lstsq", "full", "obs")
NEEDS_FISHER_BLOCKS = ("rearrange", "full")


@dataclass
class PruningConfig:
    """How to prune: a criterion, one budget, and constraints.

    Exactly one budget: ``macs_ratio``, ``params_ratio`` or ``latency_ratio`` (fractions of the dense
    transformer layers' MACs, of the model's parameters, or of the layers' latency measured on this device at
    ``latency_batch_size`` x ``seq_len`` to keep), or ``head_ratio`` and/or ``ffn_ratio`` (fractions of heads /
    neurons to keep).

    ``scope``: ``global`` ranks all heads and neurons together (layers end up with different widths),
    ``per_layer`` keeps the same share in every layer (ratio budgets), ``uniform`` keeps the same number of heads
    (whole key/value groups) and neurons in every layer under any budget, so families with an explicit head size
    (Llama, Mistral, Qwen) save a plain checkpoint. ``search`` (params, MACs or latency budget) searches uniform
    shapes across depth, hidden size, key/value groups and FFN width and keeps the best retraining-free
    (:mod:`hfprune.pruning.search`, default settings there; recovery ``obs`` or ``none``).

    ``recovery`` (Kwon et al. 2022, needs calibration data): ``rearrange`` re-picks which heads/neurons each
    layer keeps from the layer's full Fisher matrix (only criteria that keep it: ``Importance.fisher_blocks``,
    i.e. ``fisher``), ``lstsq`` fits the kept heads'/neurons' output scales per layer by least squares to the
    dense layer's output and folds them into the weights, ``full`` does both, ``none`` neither. ``obs``
    (structured Optimal Brain Surgeon, ZipLM/SlimGPT; any criterion) keeps each layer's counts but re-picks its FFN
    neurons and updates every pruned block's output projection to reconstruct that projection's output on
    calibration data (:mod:`hfprune.pruning.recovery.obs`). ``auto`` means ``rearrange`` for a criterion that keeps
    Fisher blocks and ``none`` for the others: on the MiniLM movie-review benchmark rearrangement helped (-1.13
    instead of -1.98 accuracy points at 50% MACs, equal at 60%) while least-squares tuning hurt
    (benchmarks/oneshot_minilm.py).
    ``bias_compensation`` (FLAP, An et al. 2024) replaces each removed unit's output with its calibration mean,
    folded into the output projection's bias.

    ``target="hidden"`` prunes the hidden size (the residual stream's channels, embeddings and head included; see
    :mod:`hfprune.core.hidden`) instead of heads and neurons: ``criterion`` scores channels (``activation``,
    ``fisher``, ``magnitude`` or ``random``: :mod:`hfprune.pruning.importance.hidden`) and the budget is one of
    ``params_ratio``, ``macs_ratio`` or ``hidden_ratio`` (fraction of channels to keep). The kept count is rounded
    down to a multiple of ``round_to`` and, where the stock config can state it (Llama family), of
    ``num_attention_heads``, which the stock config requires to divide the hidden size: a plain checkpoint.

    A budget whose plan keeps no head and no neuron in any layer is refused when the plan is selected (it is a
    property of the model's costs, not of the number), unless ``allow_empty=True``.

    :meth:`build_importance` builds the configured criterion from what it declares
    (:class:`~hfprune.pruning.importance.Importance`): a seed for a seeded one, Fisher blocks where the recovery
    needs them.

    Example:

    ```python
    >>> from hfprune import PruningConfig
    >>> PruningConfig(criterion="fisher", macs_ratio=0.6).scope
    'global'
    >>> PruningConfig(criterion="magnitude", head_ratio=0.5, ffn_ratio=0.5, scope="per_layer").ffn_ratio
    0.5
    >>> PruningConfig(criterion="random", macs_ratio=0.5, seed=3).build_importance().seed
    3
    ```
    """

    criterion: str = field(default="fisher", metadata={"help": "importance criterion: see supported_importance()"})
    macs_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of the layers' MACs"})
    params_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of all parameters"})
    latency_ratio: float | None = field(default=None, metadata={
        "help": "keep this fraction of the layers' latency, measured on this device (hfprune.pruning.latency)"})
    head_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of attention heads"})
    ffn_ratio: float | None = field(default=None, metadata={"help": "keep this fraction of FFN neurons"})
    expert_ratio: float | None = field(default=None, metadata={
        "help": "keep this fraction of the routed experts of every mixture-of-experts layer (the same count in "
                "every layer, at least the router's top-k: a plain checkpoint); criterion reap or frequency"})
    hidden_ratio: float | None = field(default=None, metadata={
        "help": "keep this fraction of hidden channels (target='hidden')"})
    target: str = field(default="blocks", metadata={
        "help": f"what to prune, one of {TARGETS}: attention heads and FFN neurons, or the hidden size"})
    seq_len: int = field(default=128, metadata={"help": "sequence length at which MACs and latency are counted"})
    latency_batch_size: int = field(default=32, metadata={"help": "batch size at which latency is measured"})
    scope: str = field(default="global", metadata={"help": f"ranking scope, one of {SCOPES}"})
    normalize: str = field(default="auto", metadata={
        "help": f"score normalisation across layers, one of {NORMALIZE}; auto: none for criteria whose scores "
                "estimate the loss change, a common scale (Importance.loss_scale: fisher, taylor), per layer for the "
                "others (each block's mean score set to its cost per unit)"})
    min_heads: int = field(default=0, metadata={
        "help": "heads kept in every layer at least (0: a layer may lose its attention)"})
    round_to: int = field(default=1, metadata={"help": "keep FFN neurons in multiples of this (e.g. 8)"})
    seed: int = field(default=0, metadata={"help": "seed for a seeded criterion (Importance.seeded: random)"})
    recovery: str = field(default="auto", metadata={
        "help": f"retraining-free recovery, one of {RECOVERY}; auto: rearrange for a criterion that keeps Fisher "
                "blocks (Importance.fisher_blocks: fisher), none otherwise"})
    bias_compensation: bool = field(default=False, metadata={
        "help": "fold the calibration mean of every removed head's/neuron's output into the output projection's "
                "bias (FLAP); adds the bias where the stock config can (Llama attention_bias/mlp_bias); needs "
                "calibration data; not with recovery lstsq/full/obs"})
    recovery_examples: int | None = field(default=128, metadata={
        "help": "mask tuning, OBS and bias compensation use the first this many calibration examples (None: all); for "
                "mask tuning each example gives tokens x hidden equations for a few thousand unknowns per layer"})
    calibration_batch_size: int = field(default=32, metadata={
        "help": "batch size when the calibration data is a datasets.Dataset"})
    allow_empty: bool = field(default=False, metadata={
        "help": "accept a budget whose plan keeps no head and no neuron in any layer (every block left bias-only); "
                "off: such a budget is an error, since it is almost always a typo (1e-9 for 0.1)"})

    def __post_init__(self):
        from .importance import importance_class, supported_importance

        if not isinstance(self.criterion, str) or self.criterion not in supported_importance():
            raise ValueError(f"criterion={self.criterion!r} is not supported; choose one of {supported_importance()}")
        for name in ("scope", "normalize", "recovery", "target"):  # before any comparison: a list gets this message
            choices = {"scope": SCOPES, "normalize": NORMALIZE, "recovery": RECOVERY, "target": TARGETS}[name]
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {choices}")
        budgets = {n: getattr(self, n) for n in ("macs_ratio", "params_ratio", "latency_ratio", "head_ratio",
                                                 "ffn_ratio", "expert_ratio", "hidden_ratio")}
        for name, value in budgets.items():
            if value is None:
                continue
            _check_number(name, value, "a number in (0, 1]")
            if not 0.0 < value <= 1.0:  # also refuses nan
                raise ValueError(f"{name}={value!r} must be in (0, 1]")
            budgets[name] = float(value)
            setattr(self, name, budgets[name])
        for name in ("seq_len", "latency_batch_size", "round_to", "calibration_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("min_heads", self.min_heads, minimum=0)
        _check_int("seed", self.seed)
        if self.recovery_examples is not None:
            _check_int("recovery_examples", self.recovery_examples, minimum=1, none_ok=True)
        for name in ("bias_compensation", "allow_empty"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        given = [n for n, v in budgets.items() if v is not None]
        if self.target == "hidden" or self.hidden_ratio is not None:
            self._check_hidden(given)
            return
        kinds = {n.removesuffix("_ratio") if n in ("macs_ratio", "params_ratio", "latency_ratio") else "ratio"
                 for n in given}
        if len(kinds) != 1:
            raise ValueError("give exactly one budget: macs_ratio, params_ratio, latency_ratio, or "
                             f"head_ratio/ffn_ratio/expert_ratio; got {given or 'none'}")
        if self.scope == "search":
            self._check_search(kinds)
            return
        if kinds == {"ratio"} and self.scope == "global":
            self.scope = "per_layer"  # keep ratios are a per-layer notion
        if self.scope == "per_layer" and kinds != {"ratio"}:
            raise ValueError(
                "scope='per_layer' works with head_ratio/ffn_ratio; MACs, parameter and latency budgets rank "
                "globally ('global') or keep the same structure in every layer ('uniform')"
            )
        if self.recovery in NEEDS_FISHER_BLOCKS and not self.criterion_class.fisher_blocks:
            able = " or ".join(repr(n) for n in supported_importance() if importance_class(n).fisher_blocks)
            raise ValueError(f"recovery={self.recovery!r} re-picks heads/neurons from Fisher information and needs "
                             f"criterion={able}, not {self.criterion!r}; use recovery='lstsq' or 'none'")
        if self.bias_compensation and self.resolved_recovery in ("lstsq", "full", "obs"):
            raise ValueError(f"bias_compensation=True with recovery={self.recovery!r}: that recovery already fits the "
                             "kept units to the output with the removed units, and a bias added afterwards would "
                             "count them twice; use recovery 'none' or 'rearrange' with it")

    def _check_search(self, kinds: set) -> None:
        if kinds == {"ratio"}:
            raise ValueError("scope='search' takes a params_ratio, macs_ratio or latency_ratio budget, not "
                             "head_ratio/ffn_ratio/expert_ratio (the search chooses those)")
        if self.recovery not in ("auto", "none", "obs") or self.bias_compensation:
            raise ValueError(f"scope='search' runs recovery 'obs' or 'none' (recovery={self.recovery!r}, "
                             f"bias_compensation={self.bias_compensation})")

    def _check_hidden(self, given: list) -> None:
        from .importance.hidden import HIDDEN_CRITERIA

        if self.target != "hidden":
            raise ValueError("hidden_ratio is a budget of target='hidden'; set target='hidden' to prune the hidden "
                             "size")
        if len(given) != 1 or given[0] not in ("params_ratio", "macs_ratio", "hidden_ratio"):
            raise ValueError(f"target='hidden' takes exactly one budget: params_ratio, macs_ratio or hidden_ratio; got "
                             f"{given or 'none'}")
        if self.criterion not in HIDDEN_CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} cannot score hidden channels; with target='hidden' choose "
                             f"one of {HIDDEN_CRITERIA}")
        if self.recovery not in ("auto", "none") or self.bias_compensation:
            raise ValueError(f"target='hidden' runs no recovery (recovery={self.recovery!r}, bias_compensation="
                             f"{self.bias_compensation}); use recovery='none' and bias_compensation=False")

    @property
    def criterion_class(self) -> type:
        """The registered class of ``criterion``: its declarations (``needs_data``, ``loss_scale``, ...)."""
        from .importance import importance_class

        return importance_class(self.criterion)

    def build_importance(self, *, seed: int | None = None, for_recovery: bool = True) -> Importance:
        """The configured criterion, built from its declarations: a ``seeded`` one draws from ``seed`` (default
        ``self.seed``); one with ``fisher_blocks`` keeps them when the resolved recovery re-picks units from them,
        unless ``for_recovery=False`` (scores alone: ``PruningCallback``, which runs no recovery)."""
        cls = self.criterion_class
        kwargs = {}
        if cls.seeded:
            kwargs["seed"] = self.seed if seed is None else seed
        if cls.fisher_blocks:
            kwargs["keep_blocks"] = for_recovery and self.resolved_recovery in NEEDS_FISHER_BLOCKS
        return cls(**kwargs)

    @property
    def resolved_recovery(self) -> str:
        """The recovery that runs: ``auto`` is ``rearrange`` for a criterion that keeps Fisher blocks."""
        if self.target == "hidden":
            return "none"
        if self.recovery == "auto":
            return "rearrange" if self.criterion_class.fisher_blocks else "none"
        return self.recovery

    @property
    def resolved_normalize(self) -> str:
        """The normalisation that runs: ``auto`` is ``none`` for scores on a loss scale, ``layer`` otherwise."""
        if self.normalize == "auto":
            return "none" if self.criterion_class.loss_scale else "layer"
        return self.normalize

    @property
    def budget_kind(self) -> str:
        """``macs``, ``params``, ``latency``, ``ratio`` or (``hidden_ratio``) ``hidden``."""
        if self.hidden_ratio is not None:
            return "hidden"
        for kind in ("macs", "params", "latency"):
            if getattr(self, f"{kind}_ratio") is not None:
                return kind
        return "ratio"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def require_config(config, name: str = "config") -> PruningConfig:
    """``config`` if it is a :class:`PruningConfig`, else a ``TypeError`` that says how to make one."""
    if isinstance(config, PruningConfig):
        return config
    if isinstance(config, dict):
        raise TypeError(f"{name} must be a hfprune.PruningConfig, got the dict {config!r:.200}; build one with "
                        f"PruningConfig(**{name})")
    raise TypeError(f"{name} must be a hfprune.PruningConfig, got {type(config).__name__} {config!r:.100}")


def _check_number(name: str, value, allowed: str) -> None:
    """Refuse what Python would take silently or fail on deep inside: ``True`` is 1, ``"0.5" < 1`` raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be {allowed}, not {type(value).__name__}")


def _check_int(name: str, value, minimum: int | None = None, none_ok: bool = False) -> None:
    kind = f"an int >= {minimum}" if minimum is not None else "an int"
    kind += " or None" if none_ok else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be {kind}, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}" + (" or None" if none_ok else ""))

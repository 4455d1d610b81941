# Copyright hfprune contributors. Apache-2.0.
"""The ``Importance`` interface with what each criterion declares about itself, and the registry.

A criterion states, as class attributes, the signal it reads, whether its scores are on a loss scale, whether it
takes a seed or keeps Fisher blocks, and how :class:`~hfprune.pruning.callback.PruningCallback` scores it from a
training run. :meth:`hfprune.PruningConfig.build_importance`, one-shot pruning and the callback read these declarations;
nothing outside this package tests a criterion's name.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

# re-exported until hfprune/perplexity.py (iterate, to_device) and benchmarks/oneshot_minilm.py
# (calibration_batches) import them from core.calibration, where they now live
from ...core.calibration import calibration_batches, iterate, to_device  # noqa: F401
from ...core.masking import Masks

# what a criterion reads (Importance.signal) and what the callback can collect during training (training_signal)
WEIGHTS = "weights"  # the weights alone: no data
ACTIVATIONS = "activations"  # the inputs of each block's output projection on calibration tokens
GRADIENTS = "gradients"  # gradients of the calibration loss with respect to the weights
# gradients of the loss with respect to one gate per unit (hfprune.core.masking.Masks)
GATE_GRADIENTS = "gate_gradients"
SIGNALS = (WEIGHTS, ACTIVATIONS, GRADIENTS, GATE_GRADIENTS)
TRAINING_SIGNALS = (GATE_GRADIENTS, ACTIVATIONS)

_REGISTRY: dict = {}


class Importance:
    """Scores heads and neurons: :meth:`score` returns ``{(stack, layer, block): (units,) tensor}``, higher is
    more important. A criterion declares:

    - ``name``: its name in ``PruningConfig(criterion=...)`` and recipes.
    - ``signal``: what :meth:`score` reads, one of ``"weights"`` (no data), ``"activations"``, ``"gradients"``
      (of the loss w.r.t. the weights) or ``"gate_gradients"`` (of the loss w.r.t. a gate on each unit).
    - ``needs_data``: whether :meth:`score` needs calibration batches; follows from ``signal`` (set it only in
      criteria written before ``signal``, where ``needs_data = False`` means ``signal = "weights"``).
    - ``loss_scale``: scores estimate the loss change of removing a unit, so they compare across layers as they
      are; otherwise ``PruningConfig(normalize="auto")`` normalises them per block first.
    - ``seeded``: ``__init__`` takes ``seed`` (``PruningConfig.seed`` is passed).
    - ``fisher_blocks``: ``__init__`` takes ``keep_blocks``; with it, :meth:`score` leaves each block's ``(n, n)``
      Fisher matrix in ``self.blocks``, from which ``recovery="rearrange"`` re-picks units (and ``recovery="auto"``
      means rearrange).
    - ``training_signal``: what ``PruningCallback`` collects from training itself, without calibration data, for a
      criterion that reads data: ``"gate_gradients"`` (turned into scores by :meth:`gate_terms`),
      ``"activations"`` (by :meth:`activation_terms`), or ``None`` (calibration data needed). A ``"weights"``
      criterion needs none: it scores the current weights at each pruning step.
    - ``experts_only``: :meth:`score` scores only the routed experts of mixture-of-experts layers (``experts``,
      ``expert_ffn`` blocks; ``reap``, ``frequency``) and leaves every other block whole (absent from its scores).

    Example:

    ```python
    >>> from hfprune.pruning.importance import get_importance
    >>> fisher = get_importance("fisher")
    >>> fisher.signal, fisher.needs_data, fisher.loss_scale, fisher.training_signal
    ('gate_gradients', True, True, 'gate_gradients')
    ```
    """

    name: ClassVar[str] = ""
    signal: ClassVar[str] = ACTIVATIONS
    needs_data: ClassVar[bool] = True
    loss_scale: ClassVar[bool] = False
    seeded: ClassVar[bool] = False
    fisher_blocks: ClassVar[bool] = False
    training_signal: ClassVar[str | None] = None
    experts_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "signal" not in own and own.get("needs_data") is False:  # declared as criteria were before `signal`
            cls.signal = WEIGHTS
        needs = cls.signal != WEIGHTS
        if own.get("needs_data", needs) != needs:
            raise TypeError(f"{cls.__name__} declares signal={cls.signal!r} and needs_data={own['needs_data']}; "
                            "only a 'weights' criterion runs without data")
        cls.needs_data = needs

    def score(self, model: nn.Module, batches: Iterable | None = None) -> dict:
        raise NotImplementedError

    def gate_terms(self, grads: torch.Tensor) -> torch.Tensor:
        """Training-time form (``training_signal="gate_gradients"``): the score terms of one optimizer step from
        its gate gradients ``dL/dg`` (the batch's, averaged over ranks), elementwise; the callback sums them
        over the steps between two pruning steps."""
        raise NotImplementedError

    def block_stats(self, x: torch.Tensor, units: int) -> dict:
        """Layer-by-layer form, for an ``"activations"`` criterion: from the output projection's input rows ``x``
        (tokens, units * width) of one batch (padding left out), named sums over the rows; summed over the batches
        in order, they are what :meth:`block_score` reads. :meth:`score` and sequential pruning
        (:mod:`hfprune.pruning.sequential`) both go through it, so the two give the same scores."""
        raise NotImplementedError

    def block_score(self, block, stats: dict | None, count: torch.Tensor | None) -> torch.Tensor:
        """Layer-by-layer form: the ``(units,)`` scores of one :class:`~hfprune.core.blocks.Block` from its weights
        and, for an ``"activations"`` criterion, the summed :meth:`block_stats` over ``count`` rows. A criterion
        that implements it can prune a model one layer at a time (:func:`layerwise`); gradient criteria cannot,
        since their scores need a backward pass through the whole model."""
        raise NotImplementedError

    def activation_terms(self, x: torch.Tensor, units: int) -> torch.Tensor:
        """Training-time form (``training_signal="activations"``): from the output projection's input rows
        ``x`` (tokens, units * width) of one training batch (padding left out), a ``(units,)`` sum over the rows;
        the callback sums them over the steps between two pruning steps."""
        raise NotImplementedError


def register_importance(cls: type) -> type:
    """Add ``cls`` to the registry under ``cls.name``, after checking that its declarations hold together."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"importance criterion name {cls.name!r} is empty or already registered")
    problem = _declaration_problem(cls)
    if problem:
        raise ValueError(f"importance criterion {cls.name!r} ({cls.__name__}): {problem}")
    _REGISTRY[cls.name] = cls
    return cls


def _declaration_problem(cls: type) -> str | None:
    if cls.signal not in SIGNALS:
        return f"signal={cls.signal!r}; declare one of {SIGNALS}"
    if cls.training_signal is not None and cls.training_signal not in TRAINING_SIGNALS:
        return f"training_signal={cls.training_signal!r}; declare one of {TRAINING_SIGNALS} or None"
    method = {GATE_GRADIENTS: "gate_terms", ACTIVATIONS: "activation_terms"}.get(cls.training_signal)
    if method is not None and getattr(cls, method) is getattr(Importance, method):
        return f"training_signal={cls.training_signal!r} needs the method {method}"
    params = inspect.signature(cls).parameters
    for flag, arg in (("seeded", "seed"), ("fisher_blocks", "keep_blocks")):
        if getattr(cls, flag) and arg not in params:
            return f"{flag}=True, but __init__ takes no {arg!r} argument"
    return None


def layerwise(cls: type) -> bool:
    """Whether criterion class ``cls`` scores each block from that block alone (implements
    :meth:`Importance.block_score`, and :meth:`Importance.block_stats` when it reads activations), so a model can be
    scored one layer at a time."""
    if cls.block_score is Importance.block_score:
        return False
    return cls.signal == WEIGHTS or (cls.signal == ACTIVATIONS and cls.block_stats is not Importance.block_stats)


def supported_importance() -> list:
    return sorted(_REGISTRY)


def importance_class(name: str) -> type:
    """The registered criterion class called ``name`` (its declarations, without building it)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown importance criterion {name!r}; supported: {', '.join(supported_importance())}")
    return _REGISTRY[name]


def get_importance(name: str, **kwargs) -> Importance:
    return importance_class(name)(**kwargs)


def require_data(name: str, batches) -> None:
    if batches is None:
        raise ValueError(f"the {name!r} criterion needs calibration data")


def calibration_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's loss on ``batch``; without labels, cross-entropy against its own predictions
    (self-supervised, as Kwon et al. do for unlabeled calibration data)."""
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    logits = out.logits
    with torch.no_grad():
        target = logits.argmax(-1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def zero_scores(model: nn.Module) -> dict:
    # routed experts' blocks are left out: criteria that read projections do not score them (kept whole)
    return {k: torch.zeros_like(g) for k, g in Masks(model).gates.items() if k[2] not in ("experts", "expert_ffn")}

# Copyright hfprune contributors. Apache-2.0.
"""One scoring pass per axis, reused for every candidate and every budget (through :class:`SearchCache`).

Passes: ``depth`` (block influence per layer, :mod:`hfprune.pruning.depth`), ``hidden`` (one score per hidden
channel, :mod:`hfprune.pruning.importance.hidden`), ``blocks`` (the heads' and FFN neurons' scores by the configured
criterion, one pass for both axes) and ``experts`` (routed experts, ``reap`` or ``frequency``).
"""

from __future__ import annotations

from ..config import PruningConfig
from ..depth import block_influence
from ..importance.hidden import hidden_scores
from .cache import SearchCache
from .config import SearchConfig

# which pass serves each axis
PASS_OF = {"depth": "depth", "hidden": "hidden", "heads": "blocks", "ffn": "blocks", "experts": "experts"}


def passes_for(axes: tuple) -> tuple:
    return tuple(dict.fromkeys(PASS_OF[a] for a in axes))


def run_pass(name: str, model, batches: list, config: SearchConfig) -> object:
    """The scores of one pass: a tensor (``depth``, ``hidden``) or ``{block key: tensor}``."""
    if name == "depth":
        return block_influence(model, batches)
    if name == "hidden":
        return hidden_scores(model, batches, config.hidden_criterion, seed=config.seed)
    criterion = config.criterion if name == "blocks" else config.expert_criterion
    importance = PruningConfig(criterion=criterion, params_ratio=1.0, recovery="none",
                               seed=config.seed).build_importance(for_recovery=False)
    scores = importance.score(model, batches)
    kinds = ("experts",) if name == "experts" else ("heads", "ffn")
    return {k: v for k, v in scores.items() if k[2] in kinds}


def axis_scores(model, batches: list, config: SearchConfig, axes: tuple, cache: SearchCache) -> tuple:
    """``(scores by pass, passes run now)``: cached passes are loaded, missing ones run and are saved."""
    scores = cache.load_scores()
    ran = []
    for name in passes_for(axes):
        if name in scores:
            continue
        scores[name] = run_pass(name, model, batches, config)
        ran.append(name)
        cache.save_scores(scores)  # saved after each pass: an interrupted search keeps what it scored
    return scores, ran

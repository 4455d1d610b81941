# Copyright hfprune contributors. Apache-2.0.
"""The output projections that recovery changes: every block's, but for attention without heads or averaging its
queries (real-valued gates on a query-averaging module mean nothing). Mask tuning, bias compensation and OBS all
work on these."""

from __future__ import annotations

from torch import nn

from ...core.apply import unwrap
from ...core.blocks import iter_blocks


def tunable_blocks(model: nn.Module) -> list:
    """``[(key, output projection, width per unit)]`` in forward order (stacks, layers, attention then FFN)."""
    return tunable(iter_blocks(unwrap(model)))


def tunable(blocks) -> list:
    """:func:`tunable_blocks` of the given :class:`~hfprune.core.blocks.Block` s (one layer's, for sequential
    pruning)."""
    out = []
    for block in blocks:
        # real-valued gates on a query-averaging module mean nothing; an attention block without heads has none
        if block.is_attention and (block.spec.gate_query or block.units == 0) or block.is_expert:
            continue
        out.append((block.key, block.output_projection(), block.width))
    return out

# Copyright hfprune contributors. Apache-2.0.
"""Sparsity patterns: pure functions from a score tensor (out, in) to a boolean keep mask of the same shape.

Higher scores are kept. Ties are broken by position (a stable sort), so a mask is a function of its scores.

- ``unstructured``: the ``round((1 - sparsity) * numel)`` highest scores of the whole matrix (``per_row``: of each
  output row, as Wanda compares).
- ``N:M``: in every group of ``M`` consecutive input columns of a row, the ``N`` highest (NVIDIA's 2:4 keeps 2 of 4).
- ``block:RxC``: whole ``R x C`` tiles, ranked by the sum of their scores.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

FORMS = "'unstructured', 'N:M' (e.g. '2:4', N < M) or 'block:RxC' (e.g. 'block:4x4')"


class Pattern(NamedTuple):
    kind: str  # "unstructured", "n:m" or "block"
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @property
    def sparsity(self) -> float:
        """The sparsity an N:M pattern implies."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "n:m": f"{self.n}:{self.m}"}.get(
            self.kind, f"block:{self.rows}x{self.cols}")


def parse_pattern(text: str) -> Pattern:
    """``"unstructured"``, ``"2:4"`` or ``"block:4x4"`` as a :class:`Pattern`; a ``ValueError`` names the text."""
    if not isinstance(text, str):
        raise ValueError(f"pattern={text!r} must be a string: {FORMS}")
    t = text.strip().lower()
    if t == "unstructured":
        return Pattern("unstructured")
    nm = re.fullmatch(r"(\d+):(\d+)", t)
    if nm:
        n, m = int(nm[1]), int(nm[2])
        if not 0 < n < m:
            raise ValueError(f"pattern={text!r}: N:M needs 0 < N < M")
        return Pattern("n:m", n=n, m=m)
    block = re.fullmatch(r"block:(\d+)x(\d+)", t)
    if block:
        r, c = int(block[1]), int(block[2])
        if r < 1 or c < 1 or r * c < 2:
            raise ValueError(f"pattern={text!r}: a block has R, C >= 1 and more than one weight")
        return Pattern("block", rows=r, cols=c)
    raise ValueError(f"pattern={text!r} is not a sparsity pattern; use {FORMS}")


def check_shape(shape: tuple, pattern: Pattern, name: str = "weight") -> None:
    """``ValueError`` unless a weight of ``shape`` (out, in) can carry ``pattern``."""
    out, inp = shape
    if pattern.kind == "n:m" and inp % pattern.m:
        raise ValueError(f"{name}: {inp} input features are not a multiple of M={pattern.m} (pattern "
                         f"{pattern}); leave this weight out or choose another M")
    if pattern.kind == "block" and (out % pattern.rows or inp % pattern.cols):
        raise ValueError(f"{name}: shape {list(shape)} is not tiled by {pattern.rows}x{pattern.cols} blocks")


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest entries of the last dimension (stable: earlier positions win ties)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :keep], True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the highest ``1 - sparsity`` of ``scores`` (out, in), over the whole matrix or per row."""
    if per_row:
        return _top(scores.float(), round((1.0 - sparsity) * scores.shape[1]))
    return _top(scores.float().flatten(), round((1.0 - sparsity) * scores.numel())).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive input columns in each row of ``scores`` (out, in)."""
    out, inp = scores.shape
    check_shape((out, inp), Pattern("n:m", n=n, m=m), "scores")
    return _top(scores.float().reshape(out, inp // m, m), n).reshape(out, inp)


def block_mask(scores: torch.Tensor, sparsity: float, rows: int, cols: int) -> torch.Tensor:
    """Keep the highest ``1 - sparsity`` of the ``rows x cols`` tiles of ``scores`` (out, in), by summed score."""
    out, inp = scores.shape
    check_shape((out, inp), Pattern("block", rows=rows, cols=cols), "scores")
    tiles = scores.float().reshape(out // rows, rows, inp // cols, cols).sum((1, 3))  # (out/R, in/C)
    keep = unstructured_mask(tiles, sparsity)
    return keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def mask_for(scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """The keep mask of ``pattern`` at ``sparsity`` (ignored for N:M) from ``scores`` (out, in)."""
    if pattern.kind == "n:m":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(scores, sparsity, pattern.rows, pattern.cols)
    return unstructured_mask(scores, sparsity, per_row=per_row)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive inputs of every row keeps at most ``n`` weights."""
    out, inp = mask.shape
    return inp % m == 0 and bool((mask.reshape(out, inp // m, m).sum(-1) <= n).all())

# Copyright hfprune contributors. Apache-2.0.
"""SparseGPT (Frantar & Alistarh 2023): prune a weight column block by column block and move each removed weight's
contribution onto the columns not yet visited, with the Optimal Brain Surgeon update from the layer input's
Hessian ``H = X^T X``. The Hessian and its damped inverse are structured OBS's
(:func:`hfprune.pruning.recovery.obs.accumulate_hessian`, :func:`~hfprune.pruning.recovery.obs.damped_inverse`).
The paper's ``2 X X^T / n`` scaling is left out: the damping is relative to the mean diagonal, so the update and
the mask do not depend on the Hessian's scale.

With ``U`` the upper Cholesky factor of ``Hinv`` (so row ``i`` of ``U``, divided by ``U[i, i]``, is the OBS update
direction once columns ``< i`` are fixed), visiting column ``i``::

    err = (w_i - q_i) / U[i, i]          q_i: w_i with its pruned rows zeroed
    W[:, i:] -= err  U[i, i:]            (the columns of this block at once; later blocks lazily, per block)

The mask is chosen from ``W^2 / U[i, i]^2`` of the weights as updated so far (the paper's adaptive mask selection):
unstructured and block tiles once per column block, when it starts (the block's lowest share); N:M per group of
``M`` columns, when the group is reached, so that each group sees the updates of the groups before it.

Inputs that were zero on every calibration token (``H[i, i] = 0``) get a unit diagonal and their weights are
zeroed first, as in the paper's code: they do not change the layer's output on the calibration data, so they are
the cheapest weights to remove.
"""

from __future__ import annotations

import torch

from ..recovery.obs import DAMP, damped_inverse
from .patterns import Pattern, mask_for, nm_mask


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float,
                    block_size: int = 128, damp: float = DAMP, overwrite: bool = False) -> tuple:
    """``(W', keep mask)`` for ``weight`` (out, in) given its inputs' ``hessian`` (in, in); pure unless
    ``overwrite``. ``W'`` is float64, zero where the mask is False.

    ``overwrite=True`` (a float64 ``hessian`` the caller no longer needs): the damped inverse and its Cholesky
    factor are computed in the Hessian's storage, one (in, in) float64 matrix instead of four (0.24 GiB each at a
    1B Llama's FFN input; this sets the peak of sparsifying layer by layer); the same numbers."""
    w = weight.double().clone()
    cols = w.shape[1]
    h = hessian if overwrite and hessian.dtype == torch.float64 else hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = damped_inverse(h, damp if damp > 0 else DAMP, overwrite=True)  # undamped: H is singular for most layers
    u = torch.linalg.cholesky(hinv, upper=True, out=hinv)
    group = pattern.m if pattern.kind == "n:m" else pattern.cols if pattern.kind == "block" else 1
    step = max(block_size // group, 1) * group  # a mask group never straddles two column blocks
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        inv_d2 = u1.diagonal().pow(-2)
        if pattern.kind == "n:m":
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        else:
            keep1 = mask_for(w1.pow(2) * inv_d2, pattern, sparsity)
        for i in range(i2 - i1):
            if pattern.kind == "n:m" and i % pattern.m == 0:  # this group, from the weights as updated so far
                g = slice(i, i + pattern.m)
                keep1[:, g] = nm_mask(w1[:, g].pow(2) * inv_d2[g], pattern.n, pattern.m)
            col = w1[:, i]
            e = col * (~keep1[:, i]) / u1[i, i]  # (w - q) / d
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i1:i2] = w1 * keep1  # the update already made the pruned entries zero, up to rounding
        w[:, i2:] -= err @ u[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    return w, keep

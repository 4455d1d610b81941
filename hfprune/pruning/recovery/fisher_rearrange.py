# Copyright hfprune contributors. Apache-2.0.
"""Mask rearrangement (Kwon et al. 2022, "A Fast Post-Training Pruning Framework").

Selection fixes how many heads/neurons every layer keeps, from the diagonal of the Fisher information. Within a
layer, removing a set ``P`` of units changes the loss by about ``1/2 r^T F r`` (``r`` the indicator of ``P``,
``F`` the layer's Fisher block ``sum_x g_x g_x^T``), which also counts the interactions between units.
:func:`rearrange` re-picks which units go, keeping their number: a greedy pass, then swaps of a kept unit with a
removed one while they lower ``r^T F r``. Pure functions of the Fisher blocks: no model, no data.
"""

from __future__ import annotations

import torch


def quadratic_loss(fisher: torch.Tensor, keep) -> float:
    """``r^T F r`` for the removal indicator ``r`` of the units not in ``keep``."""
    r = torch.ones(fisher.shape[0], dtype=torch.float64)
    r[list(keep)] = 0.0
    f = fisher.double()
    return float(r @ f @ r)


def group_fisher(fisher: torch.Tensor, group: int) -> torch.Tensor:
    """The Fisher block of whole key/value groups: ``A^T F A`` with ``A`` summing each group's heads."""
    if group == 1:
        return fisher
    n = fisher.shape[0] // group
    return fisher.reshape(n, group, n, group).sum((1, 3))


def greedy_removal(fisher: torch.Tensor, count: int) -> torch.Tensor:
    """A removal indicator of ``count`` units built in one sweep: units are added least important first (by the
    diagonal); whenever one too many are removed, the one whose restoring lowers ``r^T F r`` most is restored.
    ``O(n^2)``, keeping ``F r`` up to date by columns."""
    f = fisher.double()
    n = f.shape[0]
    r = torch.zeros(n, dtype=torch.float64)
    fr = torch.zeros(n, dtype=torch.float64)
    d = f.diagonal()
    obj = 0.0
    for u in torch.argsort(d, stable=True).tolist():
        obj += 2 * float(fr[u]) + float(d[u])
        r[u] = 1.0
        fr += f[:, u]
        if r.sum() > count:
            without = (obj - 2 * fr + d).masked_fill(r == 0, torch.inf)  # objective after restoring j
            j = int(without.argmin())
            obj = float(without[j])
            r[j] = 0.0
            fr -= f[:, j]
    return r


def rearrange(fisher: torch.Tensor, keep, max_sweeps: int = 8) -> list:
    """Re-pick ``len(keep)`` kept units to lower ``r^T F r``; never raises it above that of ``keep``.

    Starts from the better of ``keep`` and :func:`greedy_removal`, then sweeps over the removed units: for each,
    the swap with the kept unit that lowers the objective most, if any. The change of ``r^T F r`` for
    (restore ``p``, remove ``k``) is ``F_kk + F_pp - 2 F_pk + 2 (F r)_k - 2 (F r)_p``.
    """
    f = fisher.double()
    n = f.shape[0]
    r = torch.ones(n, dtype=torch.float64)
    r[list(keep)] = 0.0
    count = int(r.sum())
    if count in (0, n):
        return sorted(keep)
    greedy = greedy_removal(f, count)
    if float(greedy @ f @ greedy) < float(r @ f @ r):
        r = greedy
    d = f.diagonal()
    fr = f @ r
    obj = float(r @ fr)
    for _ in range(max_sweeps):
        improved = False
        for p in torch.nonzero(r).flatten().tolist():
            delta = (d + d[p] - 2 * f[p] + 2 * fr - 2 * fr[p]).masked_fill(r != 0, torch.inf)
            k = int(delta.argmin())
            if float(delta[k]) < -1e-12 * max(abs(obj), 1e-30):  # strictly lower: no cycling
                r[p], r[k] = 0.0, 1.0
                fr += f[:, k] - f[:, p]
                obj += float(delta[k])
                improved = True
        if not improved:
            break
    return torch.nonzero(r == 0).flatten().tolist()


def rearrange_kept(kept: dict, fisher_blocks: dict, groups: dict) -> dict:
    """Apply :func:`rearrange` to every partly pruned block; ``groups[key]`` is the heads per key/value group
    (attention blocks rearrange whole groups). Blocks without a Fisher block are left as they are."""
    out = dict(kept)
    for key, keep in kept.items():
        fisher = fisher_blocks.get(key)
        if fisher is None or len(keep) in (0, fisher.shape[0]):
            continue
        group = groups.get(key, 1)
        kept_groups = sorted({i // group for i in keep})
        new = rearrange(group_fisher(fisher, group), kept_groups)
        out[key] = sorted(g * group + j for g in new for j in range(group))
    return out

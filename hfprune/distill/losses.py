# Copyright hfprune contributors. Apache-2.0.
"""Distillation losses as pure functions of tensors.

Every term is a *sum over items divided by* ``num_items``: an item is an example for sequence-level heads and
a non-padding token for token-level heads (``mask``). ``num_items`` defaults to the items in this batch (a
plain mean); under gradient accumulation and DDP the trainer passes the count of the whole accumulated,
global batch, so that summing the micro-batch losses gives the loss of the whole batch, whatever the padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def reduce_items(per_item: torch.Tensor, mask: torch.Tensor | None = None,
                 num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """``sum(per_item[mask]) / num_items`` (``num_items`` defaults to the number of items in ``mask``)."""
    if mask is not None:
        if mask.shape != per_item.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the items {tuple(per_item.shape)}")
        keep = mask.bool()
        total = torch.where(keep, per_item, torch.zeros_like(per_item)).sum()
        count = keep.sum()
    else:
        total, count = per_item.sum(), per_item.numel()
    denom = count if num_items is None else num_items
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device, total.dtype).clamp_min(1)
    else:
        denom = max(float(denom), 1.0)
    return total / denom


def kl_per_item(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dim: (..., C) -> (...).

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    log_s = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * (t * t)


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """Temperature-scaled KL per item, padding masked, normalised by ``num_items``.

    ``logits``: (B, C) for sequence-level heads, (B, T, V) for token-level ones with ``mask`` (B, T).
    """
    return reduce_items(kl_per_item(student_logits, teacher_logits, temperature), mask, num_items)


def mse_per_item(student: torch.Tensor, teacher: torch.Tensor, item_dims: int = 1) -> torch.Tensor:
    """Squared error averaged over all but the first ``item_dims`` dims: (B, ...) -> (B,) or (B, T)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    diff = (student.float() - teacher.float()).pow(2)
    if diff.dim() <= item_dims:
        return diff
    return diff.flatten(item_dims).mean(-1)


def logits_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    num_items=None) -> torch.Tensor:
    """Squared error of the logits, averaged over classes, per item (``mask`` marks the token items)."""
    per = mse_per_item(student_logits, teacher_logits, item_dims=student_logits.dim() - 1)
    return reduce_items(per, mask, num_items)


def prediction_mse_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor, num_items=None) -> torch.Tensor:
    """Regression / forecasting: squared error to the teacher's prediction, averaged per example."""
    return reduce_items(mse_per_item(student_pred, teacher_pred, item_dims=1), None, num_items)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict:
    """Every student layer ``i`` (1-based hidden_states index) to the teacher layer at the same relative depth."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"need at least one layer, got student={student_layers}, teacher={teacher_layers}")
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


def hidden_mse_loss(student_hidden: Sequence, teacher_hidden: Sequence, layer_map: Mapping,
                    projections: Mapping | None = None, mask: torch.Tensor | None = None,
                    num_items=None) -> torch.Tensor:
    """Mean over mapped layers of the squared error of hidden states, per item.

    ``student_hidden[i]`` is (B, T, D_s) (or (B, ..., D_s)), ``teacher_hidden[j]`` (B, T, D_t). A projection
    ``projections[str(i)]`` (D_s -> D_t) is applied where given. With ``mask`` (B, T), items are tokens;
    without, items are examples (their error averaged over positions).
    """
    per = None
    for s_idx, t_idx in layer_map.items():
        if s_idx >= len(student_hidden) or t_idx >= len(teacher_hidden):
            raise ValueError(f"layer_map {s_idx} -> {t_idx} is out of range: the student has "
                             f"{len(student_hidden)} hidden states, the teacher {len(teacher_hidden)}")
        s = student_hidden[s_idx]
        proj = projections[str(s_idx)] if projections is not None and str(s_idx) in projections else None
        if proj is not None:
            s = proj(s.to(next(proj.parameters()).dtype))
        term = mse_per_item(s, teacher_hidden[t_idx], item_dims=s.dim() - 1)  # (B, T)
        if mask is None:
            term = term.flatten(1).mean(-1) if term.dim() > 1 else term  # (B,)
        per = term if per is None else per + term
    return reduce_items(per / len(layer_map), mask, num_items)


def make_projections(layer_map: Mapping, student_width: int, teacher_width: int,
                     generator: torch.Generator | None = None) -> nn.ModuleDict:
    """Learned ``D_s -> D_t`` linear maps, one per mapped student layer; empty when the widths agree."""
    mods = nn.ModuleDict()
    if student_width == teacher_width:
        return mods
    for s_idx in sorted(layer_map):
        lin = nn.Linear(student_width, teacher_width, bias=False)
        with torch.no_grad():
            bound = 1.0 / student_width ** 0.5
            lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=generator))
        mods[str(s_idx)] = lin
    return mods


def combine_losses(task: torch.Tensor | None, distill: torch.Tensor | None, hidden: torch.Tensor | None,
                   alpha: float, hidden_weight: float) -> torch.Tensor:
    """``alpha * distill + (1 - alpha) * task + hidden_weight * hidden``; missing terms count as 0."""
    parts = []
    if distill is not None and alpha > 0:
        parts.append(alpha * distill)
    if task is not None and alpha < 1:
        parts.append((1.0 - alpha) * task)
    if hidden is not None and hidden_weight > 0:
        parts.append(hidden_weight * hidden)
    if not parts:
        raise ValueError("no loss term is active: check alpha, hidden_weight and that the batch has labels")
    return sum(parts[1:], parts[0])

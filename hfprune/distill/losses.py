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


# -- causal LMs: shifted token items and top-k logits --------------------------------------------------------


def causal_token_mask(attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                      shape: tuple) -> torch.Tensor:
    """Which logits of a causal LM are items, shifted like its loss: (B, T) inputs -> (B, T - 1) bool.

    Position ``t`` predicts token ``t + 1``, so the last position never counts. Position ``t`` counts when both
    ``t`` and ``t + 1`` are real tokens (``attention_mask``) and, with ``labels``, when ``labels[t + 1] != -100``
    (the positions the language-model loss counts, so prompts masked out of the loss are masked out here too).
    ``shape`` is ``(B, T)``, used when neither mask is given.
    """
    batch, length = int(shape[0]), int(shape[1])
    keep = torch.ones(batch, max(length - 1, 0), dtype=torch.bool,
                      device=attention_mask.device if attention_mask is not None else None)
    if attention_mask is not None:
        real = attention_mask.bool()
        keep = keep & real[:, :-1] & real[:, 1:]
    if labels is not None:
        keep = keep & labels[:, 1:].ne(-100).to(keep.device)
    return keep


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple:
    """The sparse teacher: ``(values, indices, lse)`` from full logits (..., V).

    ``values`` (..., k) are the ``k`` largest raw logits (float32), ``indices`` (..., k) their token ids (int64),
    ``lse`` (...) is ``logsumexp(logits / T)`` over the whole vocabulary (float32): with it the top-k tokens get
    their true probabilities ``exp(values / T - lse)`` and the rest of the vocabulary its total mass."""
    if not 0 < k <= teacher_logits.shape[-1]:
        raise ValueError(f"top_k={k} must be in [1, {teacher_logits.shape[-1]}] (the vocabulary size)")
    logits = teacher_logits.float()
    values, indices = logits.topk(k, dim=-1)
    return values, indices, torch.logsumexp(logits / float(temperature), dim=-1)


def topk_kl_per_item(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """``T^2 * KL`` between teacher and student over the teacher's top-k tokens plus one remainder bucket.

    Both distributions are coarsened the same way: the ``k`` tokens the teacher ranks highest keep their own
    probabilities (at temperature ``T``, normalised over the whole vocabulary) and every other token is pooled in
    one bucket; the KL of these ``k + 1`` outcomes is a lower bound of the full KL (equal when the student matches
    the teacher's shape within the bucket) and equals it when ``k`` is the vocabulary size. The student's mass
    outside the teacher's top-k is penalised, unlike a KL renormalised over the top-k alone.

    ``student_logits`` (..., V); ``values``/``indices`` (..., k) and ``lse`` (...) as from :func:`teacher_topk`
    (``values`` in any float dtype: fp16/bf16 from disk). Returns (...).
    """
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1] \
            or lse.shape != values.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher top-k values "
                         f"{tuple(values.shape)}, indices {tuple(indices.shape)} and lse {tuple(lse.shape)} do "
                         "not line up")
    t = float(temperature)
    vocab, k = student_logits.shape[-1], values.shape[-1]
    if k > vocab:
        raise ValueError(f"the teacher's top-{k} is more than the student's vocabulary of {vocab}")
    indices = indices.long()
    log_p = values.float() / t - lse.float().unsqueeze(-1)  # (..., k) teacher log-probs
    scaled = student_logits.float() / t
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_q = scaled.gather(-1, indices) - log_z  # (..., k) student log-probs
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if k < vocab:  # the remainder bucket; at k == V it is empty on both sides
        p_rest = (1.0 - log_p.exp().sum(-1)).clamp_min(0.0)  # fp16 values can push the sum a hair past 1
        # log of the student's mass outside the top-k, without cancellation: a logsumexp over the other tokens
        log_q_rest = torch.logsumexp(scaled.scatter(-1, indices, float("-inf")), dim=-1) - log_z.squeeze(-1)
        safe_p = torch.where(p_rest > 0, p_rest, torch.ones_like(p_rest))
        kl = kl + torch.where(p_rest > 0, p_rest * (safe_p.log() - log_q_rest), torch.zeros_like(p_rest))
    return kl * (t * t)


def topk_kl_distill_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         lse: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None,
                         num_items=None) -> torch.Tensor:
    """:func:`topk_kl_per_item`, padding masked (``mask`` marks the items), normalised by ``num_items``."""
    return reduce_items(topk_kl_per_item(student_logits, values, indices, lse, temperature), mask, num_items)

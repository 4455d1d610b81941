# Copyright hfprune contributors. Apache-2.0.
"""Fisher: squared gradients of head/neuron gates, accumulated over calibration batches (Kwon et al. 2022).

Per example, ``(dL/dg)^2`` is the diagonal of the empirical Fisher information of the gate at g = 1;
summed over the data it estimates the loss increase of removing that head or neuron. With
``keep_blocks=True`` the criterion also keeps each block's full Fisher matrix ``sum_x g_x g_x^T`` (one
``(n, n)`` matrix per attention or FFN block), which mask rearrangement (:mod:`hfprune.pruning.recovery`) needs.

During training (``PruningCallback`` without calibration data) the score is the sum over optimizer steps of each
step's squared gate gradient (that of its whole batch, averaged over ranks; :meth:`FisherImportance.gate_terms`):
a batch-level estimate, where one-shot scoring squares each example's gradient.
"""

from __future__ import annotations

import torch

from ...core.apply import unwrap
from ...core.blocks import iter_blocks
from ...core.calibration import iterate, reduce_across_processes, to_device
from ...core.masking import Masks
from .base import GATE_GRADIENTS, Importance, calibration_loss, register_importance, require_data


@register_importance
class FisherImportance(Importance):
    name = "fisher"
    signal = GATE_GRADIENTS
    loss_scale = True
    fisher_blocks = True
    training_signal = GATE_GRADIENTS

    def __init__(self, keep_blocks: bool = False):
        self.keep_blocks = keep_blocks
        self.blocks: dict = {}  # (stack, layer, block) -> (n, n) Fisher block, when keep_blocks

    def gate_terms(self, grads: torch.Tensor) -> torch.Tensor:
        return grads.pow(2)

    def score(self, model, batches=None) -> dict:
        require_data(self.name, batches)
        model = unwrap(model)
        device = next(model.parameters()).device
        masks = Masks(model)
        for gate in masks.gates.values():
            gate.requires_grad_(True)
        scores = {k: torch.zeros_like(g, requires_grad=False) for k, g in masks.gates.items()}
        blocks = {k: torch.zeros(len(g), len(g), device=device) for k, g in masks.gates.items()} \
            if self.keep_blocks else {}
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # only the gates need gradients here
            p.requires_grad_(False)
        masks.attach()
        seen = 0
        try:
            for batch in iterate(batches, "fisher"):
                batch = to_device(batch, device)
                # per-example gradients: the Fisher is a sum of squares over examples, not of batch sums
                size = _batch_size(batch)
                rows: dict = {k: [] for k in blocks}
                fast = _batched_gradients(model, batch, size, masks)
                if fast is not None:  # one backward pass gave every example's gate gradients
                    for key, g in fast.items():
                        scores[key] += g.pow(2).sum(0)
                        if key in blocks:
                            blocks[key] += g.T @ g
                    seen += size
                    continue
                for j in range(size):
                    one = {k: v[j : j + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v
                           for k, v in batch.items()}
                    grads = torch.autograd.grad(calibration_loss(model, one), list(masks.gates.values()),
                                                allow_unused=True)
                    for key, grad in zip(masks.gates, grads):
                        grad = torch.zeros_like(scores[key]) if grad is None else grad.detach().float()
                        scores[key] += grad.pow(2)
                        if key in rows:
                            rows[key].append(grad)
                    seen += 1
                for key, grads in rows.items():
                    g = torch.stack(grads)  # (examples, n)
                    blocks[key] += g.T @ g
        finally:
            masks.remove()
            for gate in masks.gates.values():
                gate.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
        if seen == 0:
            raise ValueError("the calibration data is empty")
        self.blocks = reduce_across_processes(blocks)
        return reduce_across_processes(scores)


def _batched_gradients(model, batch: dict, size: int, masks: Masks) -> dict | None:
    """``{block key: (examples, n) gate gradients}`` from one forward/backward pass, or ``None`` where that is not
    exact and the caller falls back to one pass per example.

    Each example gets its own copy of the gates (a ``(B, n)`` leaf broadcast over its tokens), so the gradient
    of the summed per-example losses with respect to row ``j`` is example ``j``'s gradient. Exact when examples do
    not interact and the loss is a sum over examples: here, single-label classification logits ``(B, classes)``
    (cross-entropy against the labels, or against the model's own predictions without labels), and activations
    whose first dimension is the batch.
    """
    labels = batch.get("labels")
    if labels is not None and (labels.shape != (size,) or labels.is_floating_point()):
        return None
    if getattr(model.config, "problem_type", None) not in (None, "single_label_classification"):
        return None
    if any(b.spec.gate_query or b.spec.draws_rng for b in iter_blocks(model, masks.spec, kind="heads")):
        return None
    if any(b.is_expert for b in iter_blocks(model, masks.spec)):  # expert gates sit on routers, not projections
        return None
    leaves, handles, ok = {}, [], [True]

    def gate(module, key, n, width):
        leaves[key] = torch.ones(size, n, device=masks.gates[key].device, requires_grad=True)

        def pre_hook(_m, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if x.shape[0] != size or x.shape[-1] != n * width:
                ok[0] = False
                return None
            g = leaves[key].to(x.dtype).repeat_interleave(width, -1).view(size, *([1] * (x.dim() - 2)), -1)
            return ((x * g,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": x * g})

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    for block in iter_blocks(model, masks.spec):
        n = len(masks.gates[block.key])
        if n:
            gate(block.output_projection(), block.key, n, block.width)
    masks.remove()  # the shared gates would only scale by one here; the per-example leaves stand in for them
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = getattr(model(**inputs), "logits", None)
        if not ok[0] or logits is None or logits.shape[:1] != (size,) or logits.dim() != 2:
            return None
        target = labels if labels is not None else logits.detach().argmax(-1)
        loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        keys = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        masks.attach()
    out = {k: torch.zeros(size, len(masks.gates[k]), device=logits.device) if g is None else g.detach().float()
           for k, g in zip(keys, grads)}
    for k, gate_ in masks.gates.items():
        out.setdefault(k, torch.zeros(size, len(gate_), device=gate_.device))
    return out


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("a calibration batch needs at least one tensor with a batch dimension")

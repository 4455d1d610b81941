# Copyright hfprune contributors. Apache-2.0.
"""Importance of hidden (residual stream) channels: one score per channel of the whole model, higher = keep.

- ``activation`` (Minitron, Muralidharan et al. 2024): each channel's root-mean-square output of every norm over
  the hidden size (each layer's norms and the final or embedding norm: what every reader of the stream sees),
  over the calibration tokens without padding, summed over the norms.
- ``fisher``: per example, the gradient of the loss with respect to a gate on the channel at every place the
  stream is written (embedding outputs, every attention and FFN output projection; with LayerNorm also every norm's
  output), squared and summed over
  examples: the diagonal empirical Fisher of the gates at 1, which estimates the loss increase of zeroing the
  channel (for RMSNorm families exactly what the sliced model does: ``hfprune.core.hidden``).
- ``magnitude`` (no data): each channel's share of the squared weights of every parameter along the hidden size.
- ``random`` (no data): a seeded baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.arch import get_adapter
from ...core.calibration import iterate, reduce_across_processes, to_device, token_rows
from ...core.hidden import hidden_parameters, norm_modules
from ...core.structure import hidden_sites

HIDDEN_CRITERIA = ("activation", "fisher", "magnitude", "random")


def hidden_scores(model: nn.Module, batches, criterion: str, seed: int = 0) -> torch.Tensor:
    """``(hidden size,)`` scores of ``model``'s hidden channels by ``criterion`` (one of :data:`HIDDEN_CRITERIA`)."""
    model = unwrap(model)
    if criterion not in HIDDEN_CRITERIA:
        raise ValueError(f"criterion {criterion!r} cannot score hidden channels; choose one of {HIDDEN_CRITERIA}")
    if criterion in ("activation", "fisher") and batches is None:
        raise ValueError(f"hidden-channel criterion {criterion!r} needs calibration data")
    return {"activation": activation_scores, "fisher": fisher_scores, "magnitude": magnitude_scores,
            "random": random_scores}[criterion](model, batches, seed)


def activation_scores(model: nn.Module, batches, seed: int = 0) -> torch.Tensor:
    norms = norm_modules(model)
    device = next(model.parameters()).device
    sums = [torch.zeros(n.weight.shape[0], device=device) for n in norms]
    count = torch.zeros((), device=device)
    current: dict = {}

    def make(i):
        def hook(_m, _args, out):
            y = token_rows(out.detach().float(), current["batch"])  # (tokens, H), no padding
            sums[i] += y.pow(2).sum(0)

        return hook

    handles = [n.register_forward_hook(make(i)) for i, n in enumerate(norms)]
    try:
        with torch.no_grad():
            for batch in iterate(batches, "hidden activation"):
                current["batch"] = batch = to_device(batch, device)
                model(**batch)
                mask = batch.get("attention_mask")
                ids = batch.get("input_ids")
                count += mask.sum() if isinstance(mask, torch.Tensor) else ids.numel() if ids is not None else 1
    finally:
        for h in handles:
            h.remove()
    reduced = reduce_across_processes({**{i: s for i, s in enumerate(sums)}, "count": count})
    if float(reduced["count"]) == 0:
        raise ValueError("the calibration data is empty")
    return sum((reduced[i] / reduced["count"]).sqrt() for i in range(len(norms))).cpu()


def fisher_scores(model: nn.Module, batches, seed: int = 0) -> torch.Tensor:
    spec = get_adapter(model).arch_spec(model.config)
    sites = hidden_sites(model, spec)
    # RMSNorm: a channel zero in the stream is zero after every norm. LayerNorm shifts it by the mean, and the
    # reference drops it from the norms' outputs too: gate those as well
    writers = sites["embeddings"] + sites["writers"] + ([] if spec.hidden.rms else sites["norms"])
    device = next(model.parameters()).device
    size = sites["embeddings"][0].weight.shape[1]
    scores = torch.zeros(size, device=device)
    gate: dict = {}

    def hook(_m, _args, out):
        if isinstance(out, torch.Tensor) and out.shape[-1] == size and out.shape[0] == gate["g"].shape[0]:
            return out * gate["g"].to(out.dtype).view(out.shape[0], *([1] * (out.dim() - 2)), size)
        return None

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only the gates need gradients
        p.requires_grad_(False)
    handles = [m.register_forward_hook(hook) for m in dict.fromkeys(writers)]
    seen = 0
    try:
        for batch in iterate(batches, "hidden fisher"):
            batch = to_device(batch, device)
            n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            gate["g"] = torch.ones(n, size, device=device, requires_grad=True)  # one gate row per example
            loss = _summed_example_losses(model, batch)
            (grad,) = torch.autograd.grad(loss, [gate["g"]])
            scores += grad.detach().float().pow(2).sum(0)
            seen += n
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    if seen == 0:
        raise ValueError("the calibration data is empty")
    return reduce_across_processes({"s": scores})["s"].cpu()


def _summed_example_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """The sum over examples of each example's mean loss, so the gradient of a per-example gate is that example's
    own: causal-LM labels are shifted, ``-100`` ignored; without labels, the model's own predictions."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch.get("labels")
    if logits.dim() == 3:  # (B, T, V): a language model (causal: next-token targets) or token classifier
        name = type(model).__name__
        causal = getattr(model.config, "is_decoder", False) or name.endswith(("CausalLM", "LMHeadModel"))
        if labels is None:
            labels = logits.detach().argmax(-1)
            causal = False
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        valid = (labels != -100).float()
        return ((loss * valid).sum(1) / valid.sum(1).clamp_min(1)).sum()
    target = labels if labels is not None and not labels.is_floating_point() else logits.detach().argmax(-1)
    return nn.functional.cross_entropy(logits, target, reduction="sum")


def magnitude_scores(model: nn.Module, batches=None, seed: int = 0) -> torch.Tensor:
    total = None
    for param, dim in hidden_parameters(model):
        w = param.detach().float().pow(2)
        share = w.sum(tuple(d for d in range(w.dim()) if d != dim)) / w.sum().clamp_min(1e-30)
        total = share if total is None else total + share
    return total.cpu()


def random_scores(model: nn.Module, batches=None, seed: int = 0) -> torch.Tensor:
    size = hidden_sites(model, get_adapter(model).arch_spec(model.config))["embeddings"][0].weight.shape[1]
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))

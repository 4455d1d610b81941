# Copyright hfprune contributors. Apache-2.0.
"""Mask tuning (Kwon et al. 2022, "A Fast Post-Training Pruning Framework").

Per layer, in forward order, the kept heads'/neurons' output scales ``s`` are fitted by least squares so that the
pruned block's contribution to the residual stream (its ``o``/``down`` projection output, computed on the pruned
model's own hidden states, so earlier layers' errors are compensated too) matches the dense block's on calibration
data. The scales are folded into the ``o``/``down`` input columns, so the result is a plain pruned model.

The math is in pure functions (:func:`normal_equations`, :func:`solve_scales`, :func:`residual`,
:func:`fold_scales`); :func:`tune_scales` runs the calibration passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.blocks import base_layer, bias_of, is_conv1d, merged_weight
from ...core.calibration import capture, device_batches, iterate, token_rows
from ...core.masking import Masks
from .tunable import tunable_blocks

RIDGE = 1e-4  # relative to the mean diagonal of A^T A: keeps near-collinear units from blowing up
CLAMP = (-10.0, 10.0)  # scales outside this range are not trusted (Kwon et al. clamp the same way)


def normal_equations(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, keep: list, width: int) -> tuple:
    """``(A^T A, A^T b)`` of the least-squares problem for the scales of the units ``keep``.

    ``x``: (tokens, units * width) input of the output projection, ``weight``: its (out, units * width) weight,
    ``target``: (tokens, out). Column ``u`` of ``A`` is unit ``u``'s contribution ``x_u W_u^T`` flattened.
    """
    keep_t = torch.as_tensor(keep, dtype=torch.long, device=x.device)
    out = weight.shape[0]
    x = x.reshape(x.shape[0], -1, width)[:, keep_t].double()  # (N, k, w)
    w = weight.reshape(out, -1, width)[:, keep_t].double()  # (out, k, w)
    y = target.double()
    if width == 1:  # neurons: A^T A = (X^T X) * (W^T W), never forming the (N, k, out) contributions
        xs, ws = x[..., 0], w[..., 0]
        return (xs.T @ xs) * (ws.T @ ws), ((y @ ws) * xs).sum(0)
    contrib = torch.einsum("nkd,okd->nko", x, w)  # (N, k, out): each head's contribution
    return torch.einsum("nko,njo->kj", contrib, contrib), torch.einsum("nko,no->k", contrib, y)


def solve_scales(ata: torch.Tensor, atb: torch.Tensor, ridge: float = RIDGE, clamp: tuple = CLAMP) -> torch.Tensor:
    """``argmin_s |A s - b|^2 + ridge * mean(diag(A^T A)) * |s|^2`` from the normal equations, clamped to
    ``clamp``. Solved with ``torch.linalg.lstsq`` (rank-deficient systems get the minimum-norm solution)."""
    ata, atb = ata.double(), atb.double()
    lam = ridge * float(ata.diagonal().mean()) if ata.numel() else 0.0
    system = ata + lam * torch.eye(len(ata), dtype=ata.dtype, device=ata.device)
    driver = "gelsd" if system.device.type == "cpu" else None
    s = torch.linalg.lstsq(system, atb[:, None], driver=driver).solution.flatten()
    return s.clamp(*clamp)


def residual(ata: torch.Tensor, atb: torch.Tensor, s: torch.Tensor) -> float:
    """``|A s - b|^2 - |b|^2`` (the part that depends on ``s``)."""
    s = s.double()
    return float(s @ ata.double() @ s - 2 * s @ atb.double())


def fold_scales(module: nn.Module, scales: torch.Tensor, width: int = 1) -> None:
    """Multiply the input columns of ``module`` (an output projection: Linear, Conv1D or LoRA-wrapped) by
    ``scales`` repeated ``width`` times: the same as gating its input with ``scales``."""
    base = base_layer(module)
    with torch.no_grad():
        col = scales.repeat_interleave(width).to(base.weight.device, base.weight.dtype)
        if is_conv1d(base):  # weight (in, out)
            base.weight.mul_(col[:, None])
        else:
            base.weight.mul_(col[None, :])
        if base is not module:  # LoRA: B A x sees the same scaled input
            for a in module.lora_A.values():
                a.weight.mul_(col[None, :])


def tune_scales(model: nn.Module, kept: dict, batches, ridge: float = RIDGE, clamp: tuple = CLAMP,
                max_examples: int | None = None) -> dict:
    """Fit the kept units' output scales block by block and fold them into the weights of the dense ``model``
    (before slicing). ``kept``: ``{block key: kept indices}`` (missing: kept whole). Returns
    ``{block key: scales of its kept units}`` for the blocks it changed.

    Targets come from the dense model (all gates 1): the output projection's output without its bias, cached
    for all blocks in one pass when that takes under :data:`CACHE_BYTES`, else recomputed per block. Per block, a
    pass with the earlier blocks already tuned (gates = their scales, 0 for removed units) gives the block's raw
    input; it stops at the block. ``max_examples`` uses only the first examples of ``batches`` (each example
    gives tokens x hidden rows for at most a few thousand unknowns per block). A block keeps scales of 1 when
    the fit does not lower the calibration error (e.g. after clamping). LoRA-wrapped projections are tuned on
    their merged weight.
    """
    model = unwrap(model)
    batches = device_batches(model, iterate(batches, "recovery data"), max_examples)
    masks = Masks(model)
    tuned = {k: torch.ones_like(g) for k, g in masks.gates.items()}
    for key, keep in kept.items():
        if key in tuned and keep is not None and len(keep) < len(tuned[key]):
            tuned[key].zero_()
            tuned[key][list(keep)] = 1.0
    blocks = tunable_blocks(model)
    masks.attach()
    result = {}
    try:
        targets = _dense_targets(model, masks, blocks, batches)
        for key, module, width in iterate(blocks, "mask tuning"):
            keep = torch.nonzero(tuned[key]).flatten().tolist()
            if not keep:
                continue
            weight = merged_weight(module)
            bias = bias_of(module)
            ata = torch.zeros(len(keep), len(keep), dtype=torch.float64, device=weight.device)
            atb = torch.zeros(len(keep), dtype=torch.float64, device=weight.device)
            with torch.no_grad():
                for j, batch in enumerate(batches):
                    if targets is None:
                        _set(masks, None)
                        y = capture(model, module, batch, "output")
                        y = token_rows(y - bias if bias is not None else y, batch)
                    else:
                        y = targets[j][key]
                    _set(masks, tuned, ones=key)  # the tuned block's own gate is one: its input is read raw
                    x = capture(model, module, batch, "input")
                    a, b = normal_equations(token_rows(x, batch), weight, y, keep, width)
                    ata += a
                    atb += b
            s = solve_scales(ata, atb, ridge, clamp)
            ones = torch.ones_like(s)
            if residual(ata, atb, s) < residual(ata, atb, ones):
                tuned[key][keep] = s.to(tuned[key].dtype)
                result[key] = s.float().cpu()
    finally:
        masks.remove()
    for key, module, width in blocks:
        if key in result:
            fold_scales(module, tuned[key], width)
    return result


CACHE_BYTES = 2**30  # dense targets of all blocks are cached when they fit in this


def _dense_targets(model: nn.Module, masks: Masks, blocks: list, batches: list) -> list | None:
    """Per batch, ``{block key: (tokens, out) dense output minus bias}`` from one dense pass, or ``None`` when
    that would take more than :data:`CACHE_BYTES`."""
    _set(masks, None)
    out: list = []
    current: dict = {}
    batch_ref: dict = {}

    def watch(key, module):
        bias = bias_of(module)

        def hook(_m, _args, output):
            y = (output[0] if isinstance(output, tuple) else output).detach()
            current[key] = token_rows(y - bias if bias is not None else y, batch_ref["b"])

        return module.register_forward_hook(hook)

    handles = [watch(key, module) for key, module, _ in blocks]
    try:
        with torch.no_grad():
            for batch in batches:
                batch_ref["b"] = batch
                current = {}
                model(**batch)
                out.append(current)
                size = sum(t.numel() * t.element_size() for t in current.values())
                if size * len(batches) > CACHE_BYTES:
                    return None
    finally:
        for h in handles:
            h.remove()
    return out


def _set(masks: Masks, values, ones=None) -> None:
    """Gates to ``values`` (``None``: all ones, the dense model); the block ``ones`` reads its input ungated."""
    with torch.no_grad():
        for key, gate in masks.gates.items():
            gate.copy_(values[key] if values is not None and key != ones else torch.ones_like(gate))

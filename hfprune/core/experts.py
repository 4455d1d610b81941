# Copyright hfprune contributors. Apache-2.0.
"""Gates on the routed experts of mixture-of-experts layers, for masking and scoring (the experts' counterpart of
the output-projection gates in :mod:`hfprune.core.masking`).

An expert's gate acts on its router logit: the router's top-k routing is recomputed from ``logits + log(gate)``, so
a zero gate sets the logit to minus infinity (the expert is never picked and drops out of the softmax, exactly what
slicing it away does) and a gate of one changes nothing. A neuron's gate scales its column of ``down_proj`` for the
duration of the experts module's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .structure import ExpertsSpec


def route(logits: torch.Tensor, top_k: int, spec: ExpertsSpec, renormalize: bool,
          out_dtype: torch.dtype) -> tuple:
    """``(top-k weights, top-k indices)`` of router logits (tokens, experts), as the family's router computes them."""
    if spec.softmax == "top_k":  # gpt-oss: top-k logits, then a softmax over them
        values, index = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=1, dtype=values.dtype), index
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    values, index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values.to(out_dtype), index


def renormalizes(router: nn.Module, spec: ExpertsSpec) -> bool:
    return spec.renormalize if isinstance(spec.renormalize, bool) else bool(getattr(router, spec.renormalize))


def hook_router(router: nn.Module, spec: ExpertsSpec, gate: torch.Tensor):
    """A forward hook on ``router`` that re-routes from ``logits + log(gate)``; returns its handle. The router's
    logits themselves are returned unchanged (the auxiliary load-balancing loss reads them)."""

    def hook(module, _args, output):
        logits, weights = output[0], output[1]
        g = gate.to(logits.device)
        # log 1 = 0 and log 0 = -inf, with a finite gradient (zero) for a removed expert's gate
        shift = torch.where(g > 0, torch.log(g.clamp_min(torch.finfo(g.dtype).tiny)), float("-inf"))
        masked = logits + shift.to(logits.dtype)
        values, index = route(masked, module.top_k, spec, renormalizes(module, spec), weights.dtype)
        return (logits, values, index) + tuple(output[3:])

    return router.register_forward_hook(hook)


def hook_expert_neurons(experts: nn.Module, gate: torch.Tensor) -> list:
    """Hooks that scale each expert's ``down_proj`` columns (E, H, I) by ``gate`` (E * I) while ``experts`` runs."""
    saved: list = []

    def pre_hook(module, _args):
        down = module._parameters["down_proj"]
        saved.append(down)
        scale = gate.to(down.device, down.dtype).reshape(down.shape[0], 1, down.shape[2])
        module._parameters["down_proj"] = down * scale  # a tensor, not a Parameter, for this forward only

    def hook(module, _args, _output):
        if saved:
            module._parameters["down_proj"] = saved.pop()

    return [experts.register_forward_pre_hook(pre_hook), experts.register_forward_hook(hook, always_call=True)]


def routed_pass(model: nn.Module, batches, on_route, what: str) -> None:
    """One no-grad pass over ``batches`` calling ``on_route(block, x, weights, index)`` for every MoE layer's
    routing of the non-padding tokens: ``x`` (tokens, hidden) the router's input, ``weights`` / ``index``
    (tokens, top-k) its choice. ``block`` is the layer's ``experts`` :class:`~hfprune.core.blocks.Block`."""
    from .blocks import iter_blocks
    from .calibration import hooked_pass
    from .structure import get_module

    current: dict = {}
    handles = []

    def make_hook(block):
        def hook(_module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            weights, index = output[1].detach(), output[2]
            mask = current["batch"].get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.numel() == len(x):
                keep = mask.to(x.device).reshape(-1).bool()
                x, weights, index = x[keep], weights[keep], index[keep]
            on_route(block, x, weights.float(), index)

        return hook

    for block in iter_blocks(model, kind="experts"):
        handles.append(get_module(block.layer, block.spec.router).register_forward_hook(make_hook(block)))
    hooked_pass(model, batches, handles, what, current)


def expert_outputs(block, x: torch.Tensor, expert: int) -> tuple:
    """``(output, neurons)`` of routed expert ``expert`` on tokens ``x`` (tokens, hidden): its output (tokens,
    hidden), and for the ``gate_up`` layout each neuron's contribution norm ``|h_j| * ||down[:, j]||`` (tokens, I)
    (``None`` for other layouts)."""
    experts = block.module()
    if block.spec.layout != "gate_up":  # run the module itself with every token sent to this expert at weight 1
        index = torch.full((len(x), 1), expert, dtype=torch.long, device=x.device)
        return experts(x, index, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)), None
    gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    h = experts.act_fn(gate) * up  # (tokens, I)
    down = experts.down_proj[expert]  # (H, I)
    return nn.functional.linear(h, down), h.abs() * down.norm(dim=0)


def expert_terms(block, fn) -> torch.Tensor:
    """Per-weight terms ``fn(parameter)`` (same shape) summed per unit of an ``experts`` block (an expert: its
    router row and all of its matrices) or an ``expert_ffn`` block (a neuron: its gate and up rows and its down
    column): ``(units,)``."""
    from .structure import get_module

    router, experts = get_module(block.layer, block.spec.router), block.module()
    if block.kind == "experts":
        params = [*router.parameters(recurse=False), *experts.parameters(recurse=False)]
        return sum(fn(p).reshape(p.shape[0], -1).sum(1) for p in params).detach().float()
    width = experts.down_proj.shape[-1]
    gate_up = fn(experts.gate_up_proj).sum(2)  # (E, 2I): [gate; up] rows
    down = fn(experts.down_proj).sum(1)  # (E, I): columns
    return (gate_up[:, :width] + gate_up[:, width:] + down).flatten().detach().float()

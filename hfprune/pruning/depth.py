# Copyright hfprune contributors. Apache-2.0.
"""Depth pruning: drop whole decoder blocks that change their input least (ShortGPT's "block influence").

A block's influence is ``1 - cos(h_in, h_out)`` averaged over the tokens of calibration data, where ``h_in`` is
the hidden state entering the block and ``h_out`` the one leaving it (Men et al. 2024, "ShortGPT"). A block
whose output nearly equals its input (influence near 0) is mostly the residual stream passing through, and
removing it changes the model least. Blocks are dropped from the least influential up until the model meets a
parameter budget; the result is a :class:`~hfprune.core.plan.PrunePlan` with ``{"drop": true}`` entries, which
``apply_plan`` turns into a plain checkpoint (fewer ``num_hidden_layers``).

The math (:func:`token_influence`, :func:`choose_drops`) is pure; :func:`block_influence` only collects hidden
states with hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.apply import model_dims, unwrap
from ..core.arch import get_adapter
from ..core.calibration import iterate, reduce_across_processes, to_device
from ..core.plan import PrunePlan
from ..core.structure import get_module


def token_influence(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """Sum over valid tokens of ``1 - cos(h_in, h_out)`` and the number of valid tokens.

    ``h_in``, ``h_out``: (B, T, H); ``mask``: (B, T), nonzero where the token is real (padding is left out).
    """
    if h_in.shape != h_out.shape:
        raise ValueError(f"input and output hidden states differ in shape: {tuple(h_in.shape)} vs {tuple(h_out.shape)}")
    cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
    influence = 1.0 - cos
    if mask is None:
        return influence.sum(), influence.numel()
    mask = mask.to(influence.device).bool()
    return influence[mask].sum(), int(mask.sum())


def choose_drops(influence: list | torch.Tensor, layer_params: list, total_params: int, budget_params: float,
                 protect: Iterable = ()) -> list:
    """Indices of the layers to drop, least influential first, until ``total - dropped <= budget`` (pure).

    ``layer_params[i]`` is what dropping layer ``i`` saves. Layers in ``protect`` are never dropped and at least
    one layer always stays. Raises ``ValueError`` if the budget cannot be met that way.
    """
    influence = [float(x) for x in influence]
    if len(influence) != len(layer_params):
        raise ValueError(f"{len(influence)} influence scores for {len(layer_params)} layers")
    protect = set(protect)
    order = sorted((i for i in range(len(influence)) if i not in protect), key=lambda i: (influence[i], i))
    drops, remaining = [], float(total_params)
    for i in order:
        if remaining <= budget_params:
            break
        if len(drops) == len(influence) - 1:
            break
        drops.append(i)
        remaining -= layer_params[i]
    if remaining > budget_params:
        raise ValueError(f"dropping {len(drops)} of {len(influence)} layers leaves {remaining:,.0f} parameters, "
                         f"above the budget of {budget_params:,.0f}")
    return sorted(drops)


def _decoder_layers(model: nn.Module) -> tuple:
    spec = get_adapter(model).arch_spec(model.config)
    if "layers" not in spec.stacks:
        raise ValueError(f"{model.config.model_type} has no 'layers' stack to drop blocks from")
    stack = spec.stacks["layers"]
    if not stack.droppable:
        raise ValueError(f"layers of this {model.config.model_type} stack cannot be dropped")
    return list(get_module(model.base_model, stack.layers))


def block_influence(model: nn.Module, batches: Iterable) -> torch.Tensor:
    """Per decoder layer, the mean ``1 - cos(input, output)`` over the tokens of ``batches``: shape (layers,).

    ``batches`` are model-ready dicts (``input_ids`` and, for padded data, ``attention_mask``).
    """
    model = unwrap(model)
    layers = _decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    state: dict = {}

    def before(i):
        def hook(_module, args, kwargs):
            state[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i):
        def hook(_module, _args, output):
            h_out = output if isinstance(output, torch.Tensor) else output[0]
            total, n = token_influence(state.pop(i), h_out, state.get("mask"))
            sums[i] += float(total)
            counts[i] += n
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(i)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterate(batches, "block influence"):
                batch = to_device(batch, device)
                state["mask"] = batch.get("attention_mask")
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts.any():
        raise ValueError("the calibration data is empty")
    scores = {"sums": sums, "counts": counts}
    scores = reduce_across_processes(scores)  # same drops on every rank
    return (scores["sums"] / scores["counts"].clamp(min=1)).float()


def layer_param_counts(model: nn.Module) -> list:
    """Parameters of each decoder layer (what dropping it saves)."""
    return [sum(p.numel() for p in layer.parameters()) for layer in _decoder_layers(unwrap(model))]


def depth_plan(model: nn.Module, batches: Iterable | None = None, *, params_ratio: float | None = None,
               params: int | None = None, num_drop: int | None = None, influence: torch.Tensor | None = None,
               protect: Iterable = ()) -> PrunePlan:
    """A plan dropping the least influential decoder layers. Give exactly one budget:

    - ``params_ratio``: keep at most this fraction of the model's parameters;
    - ``params``: keep at most this many parameters;
    - ``num_drop``: drop exactly this many layers.

    Pass ``influence`` (from :func:`block_influence`) to reuse scores; otherwise ``batches`` are scored.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hfprune.pruning.depth import depth_plan
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    >>> sum(layer.drop for layer in depth_plan(model, batches, num_drop=1).layers)
    1
    ```
    """
    given = {k: v for k, v in (("params_ratio", params_ratio), ("params", params), ("num_drop", num_drop))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one budget: params_ratio, params or num_drop; got {sorted(given) or 'none'}")
    if params_ratio is not None and not 0 < params_ratio <= 1:
        raise ValueError(f"params_ratio={params_ratio!r} must be in (0, 1]")
    target = unwrap(model)
    n_layers = len(_decoder_layers(target))
    if num_drop is not None and not 0 <= num_drop < n_layers:
        raise ValueError(f"num_drop={num_drop} must be in [0, {n_layers - 1}] (the model has {n_layers} layers)")
    if influence is None:
        if batches is None:
            raise ValueError("pass calibration batches or precomputed influence scores")
        influence = block_influence(target, batches)
    if len(influence) != n_layers:
        raise ValueError(f"{len(influence)} influence scores for a model with {n_layers} layers")
    per_layer = layer_param_counts(target)
    if num_drop is not None:
        order = sorted((i for i in range(n_layers) if i not in set(protect)), key=lambda i: (float(influence[i]), i))
        if num_drop > len(order):
            raise ValueError(f"num_drop={num_drop} but only {len(order)} layers are not protected")
        drops = sorted(order[:num_drop])
    else:
        total = sum(p.numel() for p in target.parameters())
        budget = params_ratio * total if params_ratio is not None else params
        drops = choose_drops(influence, per_layer, total, budget, protect)
    entries = [{"drop": True} if i in drops else {} for i in range(n_layers)]
    # blocks not named keep everything; the model's dims validate the plan before anything is sliced
    plan = PrunePlan.from_dict({"layers": entries, "model_type": target.config.model_type})
    plan.validate(model_dims(target))
    return plan

# Copyright hfprune contributors. Apache-2.0.
"""Layer-wise reconstruction by structured Optimal Brain Surgeon (Kurtic et al. 2023, ZipLM; Ling et al. 2024,
SlimGPT): ``PruningConfig(recovery="obs")``.

For an output projection ``W`` (out x in) whose inputs on calibration tokens are the rows of ``X``, let
``H = X^T X`` (damped: ``+ lambda I``). Removing the input columns ``R`` and moving the other columns so that the
projection's output changes least in ``||(W' - W) X^T||^2`` is, with ``Hinv = H^-1``::

    W' = W - W[:, R] Hinv[R, R]^-1 Hinv[R, :]        loss: tr(W[:, R] Hinv[R, R]^-1 W[:, R]^T)

For one column the loss is ``||W[:, j]||^2 / Hinv[j, j]``. FFN neurons are re-picked greedily: the cheapest
neuron goes, ``W`` and ``Hinv`` (by its Schur complement) are updated, and so on until as many are left as the
criterion's selection kept. Attention keeps the criterion's heads (a per-group choice keeps GQA valid) and only
its output projection is updated for the removed heads' columns.

Blocks are processed in forward order on the pruned model's own hidden states, so each block sees what it will
see after pruning: per stack, the first layer's inputs are recorded once and the layers are replayed one at a
time. The math is in pure functions (:func:`damped_inverse`, :func:`drop_columns`, :func:`greedy_drop`);
:func:`reconstruct` runs the calibration passes.
"""

from __future__ import annotations

import torch
from torch import nn

from .apply import unwrap
from .arch import get_adapter
from .importance.base import iterate, reduce_across_processes
from .recovery import _base_layer, _is_conv1d, _merged_weight, _recovery_batches, _Stop, _tokens, tunable_blocks
from .structure import get_module, in_features

DAMP = 0.01  # relative to the mean diagonal of H, as in SparseGPT: keeps rarely active units from blowing up


def damped_inverse(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``(H + damp * mean(diag H) * I)^-1`` in float64. Inputs that never fire (zero rows) stay invertible."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    scale = h.diagonal().mean()
    h.diagonal().add_(damp * float(scale))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def drop_columns(weight: torch.Tensor, hinv: torch.Tensor, cols: list) -> tuple:
    """``(W', Hinv')``: ``W`` (out, in) with the input columns ``cols`` removed and the others moved to keep the
    output on the calibration inputs (``hinv`` from :func:`damped_inverse`); removed columns are zero in ``W'``.
    ``Hinv'`` is the inverse restricted to the remaining columns (zero rows/columns at ``cols``)."""
    if not cols:
        return weight.clone(), hinv.clone()
    r = torch.as_tensor(cols, device=weight.device)
    solve = torch.linalg.solve(hinv[r][:, r], hinv[r])  # Hinv[R, R]^-1 Hinv[R, :]
    w = weight - weight[:, r] @ solve
    h = hinv - hinv[:, r] @ solve
    w[:, r] = 0
    h[r] = 0
    h[:, r] = 0
    return w, h


def greedy_drop(weight: torch.Tensor, hinv: torch.Tensor, count: int) -> tuple:
    """Remove ``count`` input columns of ``weight`` (out, in) one at a time, always the one whose removal costs
    least after the previous removals' updates. Returns ``(W', removed columns in removal order)``.

    Each removal is a rank-one downdate of ``Hinv``; rather than rewriting the (in, in) matrix every step (memory
    bound: most of the time for an FFN), the downdates are kept as rows of ``u`` (``Hinv_t = Hinv - u^T u``) and
    only the row and diagonal that the next step reads are formed."""
    w = weight.T.clone()  # (in, out): a unit's weights are one contiguous row
    diag = hinv.diagonal().clone()
    norms = (w * w).sum(1)
    u = torch.zeros(count, w.shape[0], dtype=hinv.dtype, device=hinv.device)
    alive = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    removed = []
    for t in range(count):
        cost = norms / diag.clamp_min(torch.finfo(diag.dtype).tiny)
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        row = hinv[j] - u[:t, j] @ u[:t]  # row j of the current Hinv
        pivot = row[j]
        a, c = w[j].clone(), row / pivot
        norms += c * (c * (a @ a) - 2 * (w @ a))  # ||w_i - c_i a||^2, without a second pass over w
        w.addr_(c, a, alpha=-1.0)
        u[t] = row / pivot.sqrt()
        diag -= row * c
        w[j] = 0
        norms[j] = 0
        alive[j] = False
        removed.append(j)
    return w.T.contiguous(), removed


def reconstruct(model: nn.Module, kept: dict, batches, damp: float = DAMP, max_examples: int | None = None) -> dict:
    """Structured OBS on the dense ``model`` (before slicing), block by block in forward order: FFN neurons are
    re-picked (as many as ``kept`` keeps) and attention keeps ``kept``'s heads; every pruned block's output
    projection is updated in place, its removed columns zeroed. ``kept``: ``{block key: kept indices}``
    (missing: kept whole). Returns ``kept`` with the FFN blocks' new choices.

    Raises ``ValueError`` for families whose layers do not simply feed each other (a stack cannot be replayed
    layer by layer). LoRA-wrapped projections are reconstructed on their merged weight; the change goes into
    the base weight.
    """
    model = unwrap(model)
    batches = _recovery_batches(model, batches, max_examples)
    spec = get_adapter(model).arch_spec(model.config)
    blocks = {}
    for key, module, width in tunable_blocks(model):
        blocks.setdefault(key[:2], []).append((key, module, width))
    out = dict(kept)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:  # a KV cache would grow with every replay of a layer
        model.config.use_cache = False
    saved = {key: _base_layer(module).weight.detach().clone() for layer in blocks.values()
             for key, module, _ in layer}  # restored if anything fails half-way: nothing half-written
    try:
        with torch.no_grad():
            _check_replay(model, spec, batches[0])
            for stack_key, stack in spec.stacks.items():
                layers = get_module(model.base_model, stack.layers)
                calls = [_record(model, layers, batch) for batch in batches]
                hidden = [_hidden(c[0]) for c in calls]
                for i, layer in enumerate(iterate(layers, f"OBS {stack_key}")):
                    for key, module, width in blocks.get((stack_key, i), []):
                        out.update(_block(layer, module, key, width, key[2] in stack.ffn, kept, hidden, calls,
                                          batches, i, damp))
                    hidden = [_run(layer, h, c[i]) for h, c in zip(hidden, calls)]
    except BaseException:
        with torch.no_grad():
            for layer in blocks.values():
                for key, module, _ in layer:
                    _base_layer(module).weight.copy_(saved[key])
        raise
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return out


def _block(layer, module, key, width, is_ffn, kept, hidden, calls, batches, i, damp) -> dict:
    """Reconstruct one output projection; ``{key: kept units}`` when it is an FFN block it re-picked."""
    units = in_features(module) // width
    keep = kept.get(key)
    if keep is None or len(keep) >= units:
        return {}
    hessian = _input_hessian(layer, module, hidden, [c[i] for c in calls], batches)
    hessian = reduce_across_processes({"h": hessian})["h"]  # every rank solves the same system
    weight = _merged_weight(module).double()
    hinv = damped_inverse(hessian, damp)
    if is_ffn and width == 1:
        new, removed = greedy_drop(weight, hinv, units - len(keep))
        result = {key: sorted(set(range(units)) - set(removed))}
    else:
        gone = sorted(set(range(units)) - set(keep))
        cols = [u * width + d for u in gone for d in range(width)]
        new, _ = drop_columns(weight, hinv, cols)
        result = {}
    base = _base_layer(module)
    delta = (new - weight).to(base.weight.dtype)
    base.weight.add_(delta.T if _is_conv1d(base) else delta)  # merged LoRA weight = new: removed columns silent
    return result


def _record(model: nn.Module, layers: nn.ModuleList, batch: dict) -> list:
    """Per layer of ``layers``: the ``(args, kwargs)`` it is called with in one pass of ``model`` on ``batch``."""
    seen: list = []

    def pre_hook(_m, args, kwargs):
        seen.append((args, kwargs))

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _check_replay(model: nn.Module, spec, batch: dict) -> None:
    """Raise ``ValueError`` unless every stack's layers are each called once per forward pass and each takes the
    previous layer's output as its input, so replaying a stack one layer at a time computes what the model does.
    Runs before anything changes."""
    for stack_key, stack in spec.stacks.items():
        layers = get_module(model.base_model, stack.layers)
        calls = _record(model, layers, batch)
        if len(calls) != len(layers):
            raise ValueError(f"{type(model).__name__}: stack {stack_key!r} made {len(calls)} layer calls for "
                             f"{len(layers)} layers; recovery='obs' replays each layer once")
        for i in range(len(layers) - 1):
            ran, nxt = _run(layers[i], _hidden(calls[i]), calls[i]), _hidden(calls[i + 1])
            if ran.shape != nxt.shape or not torch.allclose(ran, nxt, rtol=1e-4, atol=1e-5):
                raise ValueError(f"{type(model).__name__}: layer {i + 1} of stack {stack_key!r} does not take layer "
                                 f"{i}'s output as its input, so recovery='obs' cannot replay the stack one layer at "
                                 "a time; use recovery 'lstsq' or 'none'")


HIDDEN_KWARGS = ("hidden_states", "hidden_state")  # what layers that take it by keyword call it


def _hidden(call: tuple) -> torch.Tensor:
    """The hidden states a recorded layer call received: the first positional argument, else the keyword."""
    args, kwargs = call
    if args:
        return args[0]
    for name in HIDDEN_KWARGS:
        if name in kwargs:
            return kwargs[name]
    raise ValueError(f"a layer was called without hidden states by position or as one of {HIDDEN_KWARGS}")


def _run(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """Replay a recorded layer call on ``hidden``; the layer's output hidden states."""
    args, kwargs = call
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        name = next(n for n in HIDDEN_KWARGS if n in kwargs)
        out = layer(**{**kwargs, name: hidden})
    return out[0] if isinstance(out, tuple) else out


def _input_hessian(layer, module, hidden: list, calls: list, batches: list) -> torch.Tensor:
    """``X^T X`` (float64) of ``module``'s inputs over the non-padding tokens, replaying ``layer`` on ``hidden``."""
    total = {}

    def pre_hook(_m, args, kwargs):
        x = (args[0] if args else kwargs["input"]).detach()
        total["x"] = x
        raise _Stop

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    hessian = None
    try:
        for h, call, batch in zip(hidden, calls, batches):
            try:
                _run(layer, h, call)
            except _Stop:
                pass
            if "x" not in total:
                raise RuntimeError(f"{type(module).__name__} did not run when its layer was replayed")
            x = _tokens(total.pop("x"), batch).double()
            x = x.reshape(-1, x.shape[-1])
            hessian = x.T @ x if hessian is None else hessian + x.T @ x
    finally:
        handle.remove()
    return hessian

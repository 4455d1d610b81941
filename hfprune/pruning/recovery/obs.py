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
time. The math is in pure functions (:func:`damped_inverse`, :func:`accumulate_hessian`, :func:`drop_columns`,
:func:`greedy_drop`); :func:`record_layer_calls`, :func:`check_replay` and :func:`run_layer` replay a stack one layer
at a time (SparseGPT uses them too);
:func:`reconstruct` runs the calibration passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.apply import unwrap
from ...core.arch import get_adapter
from ...core.blocks import base_layer, get_block, is_conv1d, iter_blocks, iter_stacks, merged_weight
from ...core.calibration import Stop, device_batches, iterate, reduce_across_processes, token_rows
from ...core.layerwise import HIDDEN_KWARGS, layer_hidden, run_layer  # also read from here by sparsity
from ...core.structure import in_features
from .tunable import tunable_blocks

DAMP = 0.01  # relative to the mean diagonal of H, as in SparseGPT: keeps rarely active units from blowing up


def damped_inverse(hessian: torch.Tensor, damp: float = DAMP, overwrite: bool = False) -> torch.Tensor:
    """``(H + damp * mean(diag H) * I)^-1`` in float64. Without damping, inputs that never fire (zero rows) get a
    unit diagonal so that the matrix stays invertible (with damping they cost ``damp`` times nothing to remove).

    ``overwrite=True`` (a float64 ``hessian`` the caller no longer needs): computed in its storage and returned,
    with one (in, in) temporary instead of three copies; the same numbers (LAPACK factors and inverts in place
    either way). At a 1B Llama's FFN input a copy is 0.24 GiB, and this sets layer-by-layer pruning's peak."""
    h = hessian if overwrite and hessian.dtype == torch.float64 else hessian.double().clone()
    lam = damp * float(h.diagonal().mean())
    if lam > 0:
        h.diagonal().add_(lam)
    else:
        dead = h.diagonal() == 0
        h[dead, dead] = 1.0
    torch.linalg.cholesky(h, out=h)
    return torch.cholesky_inverse(h, out=h)


def accumulate_hessian(hessian: torch.Tensor | None, x: torch.Tensor, batch: dict) -> torch.Tensor:
    """``hessian + X^T X`` (float64) for a module input ``x`` (batch, seq, in) of ``batch``, padding left out;
    ``hessian`` ``None`` starts the sum, otherwise it is updated in place and returned. Shared by structured OBS and
    SparseGPT."""
    x = token_rows(x, batch).double()
    # in place: no second (in, in) float64 sum while the old one is alive (0.24 GiB for a 1B Llama's FFN input,
    # which sets the peak of layer-by-layer pruning)
    return x.T @ x if hessian is None else hessian.addmm_(x.T, x)


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
        c[~alive] = 0  # removed units stay exactly zero (their Hinv rows are only zero up to rounding)
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

    Refused with a ``ValueError``, before anything changes: stacks that cannot be replayed one layer at a time
    (something runs between layers, or attention draws random numbers), Autoformer's query-averaging attention
    losing heads, and DoRA layers. LoRA-wrapped projections are reconstructed on their merged weight; the change
    goes into the base weight. A projection that runs more than once per layer (PatchTST's time and channel
    attention share one) is fitted to the inputs of all its calls, taken before its own update.
    """
    model = unwrap(model)
    spec = get_adapter(model).arch_spec(model.config)
    pruned = _pruned_blocks(model, spec, kept)
    if not pruned:
        return dict(kept)
    batches = device_batches(model, iterate(batches, "recovery data"), max_examples)
    out = dict(kept)
    # restored if anything fails half-way, so nothing is half-written; kept on the CPU, only what changes
    saved = {b[0]: base_layer(b[1]).weight.detach().to("cpu", copy=True) for bs in pruned.values() for b in bs}
    use_cache = getattr(model.config, "use_cache", None)
    try:
        if use_cache is not None:  # a KV cache would grow with every replay of a layer
            model.config.use_cache = False
        with torch.no_grad():
            calls_per_block = check_replay(model, spec, batches[0], pruned)
            for stack_key, stack, layers in iter_stacks(model, spec):
                calls = [record_layer_calls(model, {stack_key: layers}, batch)[stack_key] for batch in batches]
                hidden = [layer_hidden(c[0]) for c in calls]
                for i, layer in enumerate(iterate(layers, f"OBS {stack_key}")):
                    layer_calls = [c[i] for c in calls]
                    out.update(reconstruct_layer(layer, pruned.get((stack_key, i), []), hidden, layer_calls, batches,
                                                 kept, stack.ffn, damp, calls_per_block))
                    hidden = [run_layer(layer, h, c) for h, c in zip(hidden, layer_calls)]
    except BaseException:
        with torch.no_grad():
            for bs in pruned.values():
                for key, module, _ in bs:
                    weight = base_layer(module).weight
                    weight.copy_(saved[key].to(weight.device))
        raise
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    return out


def reconstruct_layer(layer: nn.Module, blocks: list, hidden: list, calls: list, batches: list, kept: dict,
                      ffn_names, damp: float = DAMP, calls_per_block: dict | None = None) -> dict:
    """Structured OBS of one layer: each of its pruned ``blocks`` (``[(key, output projection, width per unit)]``,
    in the order they run) is fitted to the inputs its projection gets when ``layer`` is replayed on ``hidden``
    (one tensor per batch of ``batches``, with the recorded ``calls``), after the earlier blocks' updates.
    ``ffn_names``: the block names that are FFNs (their neurons are re-picked); ``calls_per_block``: how often each
    projection runs per layer call (default once). Returns ``{key: kept units}`` for the FFN blocks it re-picked.
    The in-memory :func:`reconstruct` and sequential pruning both run every layer through this."""
    out = {}
    for key, module, width in blocks:
        stop = calls_per_block is None or calls_per_block[key] == 1
        hessian = _input_hessian(layer, module, hidden, calls, batches, stop=stop)
        hessian = reduce_across_processes({"h": hessian})["h"]  # every rank solves the same system
        out.update(_update(module, key, width, key[2] in ffn_names, kept[key], hessian, damp))
    return out


def _pruned_blocks(model: nn.Module, spec, kept: dict) -> dict:
    """``{(stack, layer): [(key, output projection, width per unit)]}`` of the blocks ``kept`` prunes; raises
    ``ValueError`` for what cannot be reconstructed."""
    name = type(model).__name__
    for block in iter_blocks(model, spec, kind="heads"):
        if block.spec.draws_rng:
            raise ValueError(f"{name}: the attention of stack {block.key.stack!r} draws random numbers in every "
                             "forward pass (ProbSparse), so a replayed layer does not compute what the model did; "
                             "use attention_type='full', or recovery 'none'")
    tunable = {key: (module, width) for key, module, width in tunable_blocks(model)}
    out: dict = {}
    for key, keep in kept.items():
        if keep is None or len(keep) >= get_block(model, key, spec).units:
            continue
        if key[2] in ("experts", "expert_ffn"):
            continue  # routed experts have no output projection to refit: removed as selected
        if key not in tunable:  # Autoformer: zeroing heads' output columns is not what removing them does
            raise ValueError(f"{name}: block {key} averages query-key scores over its heads, so removing heads "
                             "is not a change of its output projection that recovery='obs' can fit; use recovery "
                             "'none', or keep its heads")
        module, width = tunable[key]
        if any(True for _ in getattr(module, "lora_magnitude_vector", {})):
            raise ValueError(f"recovery='obs' does not support the DoRA layer of block {key} (its magnitude "
                             "rescaling is not a weight change it can make); merge_and_unload() the adapter first")
        out.setdefault(key[:2], []).append((key, module, width))
    return out


def _update(module: nn.Module, key, width: int, is_ffn: bool, keep, hessian: torch.Tensor, damp: float) -> dict:
    """Reconstruct one output projection from its input Hessian; ``{key: kept units}`` for an FFN it re-picked."""
    units = in_features(module) // width
    weight = merged_weight(module).double()
    hinv = damped_inverse(hessian, damp, overwrite=True)  # the Hessian is not needed after this
    if is_ffn and width == 1:
        new, removed = greedy_drop(weight, hinv, units - len(keep))
        result = {key: sorted(set(range(units)) - set(removed))}
    else:
        gone = sorted(set(range(units)) - set(keep))
        new, _ = drop_columns(weight, hinv, [u * width + d for u in gone for d in range(width)])
        result = {}
    base = base_layer(module)
    delta = (new - weight).to(base.weight.dtype)
    base.weight.add_(delta.T if is_conv1d(base) else delta)  # merged LoRA weight = new: removed columns silent
    return result


def record_layer_calls(model: nn.Module, stacks: dict, batch: dict, keep_hidden: bool = False) -> dict:
    """``{stack key: [(args, kwargs) of each layer call]}`` for ``stacks`` (``{key: layers}``) in one pass of
    ``model`` on ``batch``. Only each stack's first hidden states are kept (the replay computes the others), unless
    ``keep_hidden``."""
    seen: dict = {key: [] for key in stacks}

    def watch(key, layer):
        def pre_hook(_m, args, kwargs):
            if seen[key] and not keep_hidden:  # layers x tokens x hidden would not fit for an LLM
                if args:
                    args = (None, *args[1:])
                else:
                    kwargs = {k: None if k in HIDDEN_KWARGS else v for k, v in kwargs.items()}
            seen[key].append((args, kwargs))

        return layer.register_forward_pre_hook(pre_hook, with_kwargs=True)

    handles = [watch(key, layer) for key, layers in stacks.items() for layer in layers]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def check_replay(model: nn.Module, spec, batch: dict, pruned: dict) -> dict:
    """Raise ``ValueError`` unless every stack's layers are each called once per forward pass and each takes the
    previous layer's output as its input, so replaying a stack one layer at a time computes what the model does.
    Also sorts each layer's pruned blocks into the order they run in (which the family's block list need not
    follow: PatchTSMixer), and returns ``{block key: calls of its output projection per forward pass}``."""
    order: dict = {}
    counts: dict = {}

    def watch(key, module):
        def pre_hook(_m, _args):
            order.setdefault(key, len(order))
            counts[key] = counts.get(key, 0) + 1

        return module.register_forward_pre_hook(pre_hook)

    handles = [watch(key, module) for bs in pruned.values() for key, module, _ in bs]
    stacks = {key: layers for key, _, layers in iter_stacks(model, spec)}
    try:  # one pass: the call counts are per forward pass
        calls = record_layer_calls(model, stacks, batch, keep_hidden=True)
    finally:
        for h in handles:
            h.remove()
    for stack_key, layers in stacks.items():
        recorded = calls[stack_key]
        if len(recorded) != len(layers):
            raise ValueError(f"{type(model).__name__}: stack {stack_key!r} made {len(recorded)} layer calls for "
                             f"{len(layers)} layers; recovery='obs' replays each layer once")
        for i in range(len(layers) - 1):
            ran, nxt = run_layer(layers[i], layer_hidden(recorded[i]), recorded[i]), layer_hidden(recorded[i + 1])
            if ran.shape != nxt.shape or not torch.allclose(ran, nxt, rtol=1e-4, atol=1e-5):
                raise ValueError(f"{type(model).__name__}: layer {i + 1} of stack {stack_key!r} does not take layer "
                                 f"{i}'s output as its input, so recovery='obs' cannot replay the stack one layer at "
                                 "a time; use recovery 'lstsq' or 'none'")
    missing = sorted(str(key) for bs in pruned.values() for key, _, _ in bs if key not in counts)
    if missing:
        raise RuntimeError(f"these output projections did not run in the calibration pass: {missing}")
    for bs in pruned.values():
        bs.sort(key=lambda b: order[b[0]])
    return counts


def _input_hessian(layer, module, hidden: list, calls: list, batches: list, stop: bool) -> torch.Tensor:
    """``X^T X`` (float64) of ``module``'s inputs over the non-padding tokens, replaying ``layer`` on ``hidden``;
    ``stop``: the module runs once per layer, so the replay ends there."""
    seen: list = []

    def pre_hook(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["input"]).detach())
        if stop:
            raise Stop

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    hessian = None
    try:
        for h, call, batch in zip(hidden, calls, batches):
            try:
                run_layer(layer, h, call)
            except Stop:
                pass
            if not seen:
                raise RuntimeError(f"{type(module).__name__} did not run when its layer was replayed")
            for x in seen:
                hessian = accumulate_hessian(hessian, x, batch)
            seen.clear()
    finally:
        handle.remove()
    return hessian

# Copyright hfprune contributors. Apache-2.0.
"""Retraining-free recovery after selection (Kwon et al. 2022, "A Fast Post-Training Pruning Framework").

Two steps, each optional:

* **Mask rearrangement.** Selection fixes how many heads/neurons every layer keeps, from the diagonal of the
  Fisher information. Within a layer, removing a set ``P`` of units changes the loss by about
  ``1/2 r^T F r`` (``r`` the indicator of ``P``, ``F`` the layer's Fisher block ``sum_x g_x g_x^T``), which
  also counts the interactions between units. :func:`rearrange` re-picks which units go, keeping their
  number: a greedy pass, then swaps of a kept unit with a removed one while they lower ``r^T F r``.
* **Mask tuning.** Per layer, in forward order, the kept heads'/neurons' output scales ``s`` are fitted by
  least squares so that the pruned block's contribution to the residual stream (its ``o``/``down``
  projection output, computed on the pruned model's own hidden states, so earlier layers' errors are
  compensated too) matches the dense block's on calibration data. The scales are folded into the ``o``/``down``
  input columns, so the result is a plain pruned model.

A third, independent step is **bias compensation** (An et al. 2024, FLAP): a removed head's or neuron's output is
replaced by its mean over the calibration tokens, which is a constant vector folded into the output projection's
bias. Families without that bias get one where their stock config can say so (Llama's ``attention_bias`` /
``mlp_bias``), so the result is still a plain checkpoint.

The math is in pure functions (:func:`quadratic_loss`, :func:`rearrange`, :func:`solve_scales`,
:func:`normal_equations`, :func:`fold_scales`, :func:`compensation`); :func:`tune_scales` and
:func:`compensate_biases` run the calibration passes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.apply import unwrap
from ..core.arch import get_adapter
from ..core.blocks import base_layer, bias_of, is_conv1d, iter_blocks, merged_weight
from ..core.calibration import capture, device_batches, token_rows
from ..core.masking import Masks
from ..core.structure import in_features, out_features
from .importance.base import iterate, reduce_across_processes

RIDGE = 1e-4  # relative to the mean diagonal of A^T A: keeps near-collinear units from blowing up
CLAMP = (-10.0, 10.0)  # scales outside this range are not trusted (Kwon et al. clamp the same way)


# ---------------------------------------------------------------------------------------------------------------
# Mask rearrangement


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


# ---------------------------------------------------------------------------------------------------------------
# Mask tuning


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


def tunable_blocks(model: nn.Module) -> list:
    """``[(key, output projection, width per unit)]`` in forward order (stacks, layers, attention then FFN)."""
    out = []
    for block in iter_blocks(unwrap(model)):
        # real-valued gates on a query-averaging module mean nothing; an attention block without heads has none
        if block.is_attention and (block.spec.gate_query or block.units == 0):
            continue
        out.append((block.key, block.output_projection(), block.width))
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# Bias compensation


def compensation(weight: torch.Tensor, mean: torch.Tensor, keep: list, width: int = 1) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]``: the average contribution of the units not in ``keep`` to the output of a
    projection with (out, units * width) ``weight`` whose mean input is ``mean``. Float64."""
    units = weight.shape[1] // width
    removed = sorted(set(range(units)) - set(keep))
    if not removed:
        return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    cols = (torch.as_tensor(removed, device=weight.device)[:, None] * width
            + torch.arange(width, device=weight.device)).flatten()
    return weight[:, cols].double() @ mean.to(weight.device)[cols].double()


def mean_inputs(model: nn.Module, modules: dict, batches: list) -> dict:
    """``{key: mean input vector}`` of each module in ``modules`` over the (non-padding) tokens of ``batches``,
    from one pass of the model as it is."""
    sums: dict = {}
    counts: dict = {}
    batch_ref: dict = {}

    def watch(key, module):
        def pre_hook(_m, args, kwargs):
            x = token_rows((args[0] if args else kwargs["input"]).detach(), batch_ref["b"]).double()
            sums[key] = sums.get(key, 0) + x.sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    handles = [watch(key, module) for key, module in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                batch_ref["b"] = batch
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    # every rank reduces every key (zeros where it saw nothing), so all ranks fold the same biases
    device = next(model.parameters()).device
    zeros = {k: torch.zeros(in_features(m), dtype=torch.float64, device=device) for k, m in modules.items()}
    sums = reduce_across_processes({k: sums.get(k, z) + z for k, z in zeros.items()})
    counts = reduce_across_processes({k: torch.tensor(float(counts.get(k, 0)), dtype=torch.float64, device=device)
                                      for k in zeros})
    missing = sorted(str(k) for k in modules if float(counts[k]) == 0)
    if missing:
        raise RuntimeError(f"these output projections did not run in the calibration passes: {missing}")
    return {key: sums[key] / counts[key] for key in modules}


def compensate_biases(model: nn.Module, kept: dict, batches, max_examples: int | None = None) -> dict:
    """Fold the calibration mean of every unit that ``kept`` removes into its block's output-projection bias, in
    the dense ``model`` (before slicing). ``kept``: ``{block key: kept indices}`` (missing: kept whole).
    Returns ``{block key: the bias change}``.

    Where an output projection has no bias, the family's config flag for one (``Adapter.bias_flag``) is set and
    every projection of that block kind, in every layer, gets a zero bias first, so that stock transformers builds
    the same modules from the saved config. Families whose config cannot add the bias raise a ``ValueError``
    before anything changes. Autoformer's query-averaging attention is not compensated (as in mask tuning).
    """
    model = unwrap(model)
    pruned = [(key, module, width) for key, module, width in tunable_blocks(model)
              if key in kept and len(kept[key]) < in_features(module) // width]
    flags = bias_flags_needed(model, [(key, module) for key, module, _ in pruned])
    batches = device_batches(model, iterate(batches, "recovery data"), max_examples)
    means = mean_inputs(model, {key: module for key, module, _ in pruned}, batches)
    deltas = {key: compensation(merged_weight(module), means[key], kept[key], width)
              for key, module, width in pruned}
    for block, flag in flags.items():  # all checks and passes done: only now change the model
        _add_zero_biases(model, block)
        setattr(model.config, flag, True)
    with torch.no_grad():
        for key, module, _ in pruned:
            bias = base_layer(module).bias
            bias.add_(deltas[key].to(bias.device, bias.dtype))
    return {key: d.float().cpu() for key, d in deltas.items()}


def bias_flags_needed(model: nn.Module, blocks: list | None = None) -> dict:
    """``{block name: config flag}`` to set so that every output projection in ``blocks`` (``[(key, module)]``;
    default: all tunable blocks) has a bias. Raises a ``ValueError`` naming the block when the family's config
    cannot add one, or when a projection is a DoRA layer (its magnitude rescaling is not folded)."""
    model = unwrap(model)
    if blocks is None:
        blocks = [(key, module) for key, module, _ in tunable_blocks(model)]
    adapter = get_adapter(model)
    flags = {}
    for key, module in blocks:
        if any(True for _ in getattr(module, "lora_magnitude_vector", {})):
            raise ValueError(f"bias compensation does not support the DoRA layer of block {key}; "
                             "merge_and_unload() the adapter first, or use bias_compensation=False")
        if bias_of(module) is None:
            flag = adapter.bias_flag(model.config, key[2])
            if flag is None:
                raise ValueError(
                    f"bias compensation needs a bias on the output projection of block {key}; "
                    f"model_type {model.config.model_type!r} has none there and its config cannot add one. "
                    "Use bias_compensation=False for this model.")
            flags[key[2]] = flag
    return flags


def _add_zero_biases(model: nn.Module, block: str) -> None:
    """A zero bias on every projection of the attention or FFN blocks named ``block`` that has none."""
    for b in iter_blocks(model):
        if b.key.name != block:
            continue
        for projection in b.projections():
            base = base_layer(projection)
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros(out_features(base), dtype=base.weight.dtype,
                                                     device=base.weight.device),
                                         requires_grad=base.weight.requires_grad)

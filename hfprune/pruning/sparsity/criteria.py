# Copyright hfprune contributors. Apache-2.0.
"""Weight scores and the calibration passes that feed them.

- ``magnitude``: ``|W|``, compared over the whole matrix.
- ``random``: seeded uniform scores (a baseline).
- ``wanda`` (Sun et al. 2024): ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over the
  calibration tokens, compared within each output row.
- ``sparsegpt``: see :mod:`.sparsegpt`; masks and weight updates at once.
- ``movement`` (Sanh et al. 2020, first order): ``-sum_t dL/dW * W``, accumulated during fine-tuning by
  :class:`~hfprune.pruning.sparsity.callback.SparsityCallback`, or over the calibration batches one-shot.

Wanda and SparseGPT run layer by layer (:func:`layerwise`): each layer's statistics are taken on the outputs of the
layers before it *after* they were sparsified, as both papers do, with structured OBS's layer replay.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.arch import get_adapter
from ...core.blocks import iter_stacks
from ...core.calibration import iterate, token_rows
from ...core.structure import base_layer, is_conv1d
from ..recovery.obs import accumulate_hessian, check_replay, layer_hidden, record_layer_calls, run_layer


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(weight.shape, generator=generator)


def wanda_scores(weight: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` from the inputs' summed squares per column ``col_sq`` (in,)."""
    return weight.detach().abs().float() * col_sq.float().sqrt().to(weight.device).unsqueeze(0)


def owl_sparsities(outlier_ratios: list, sparsity: float, lam: float) -> list:
    """OWL (Yin et al. 2024): layers with more outliers get lower sparsity, linearly in their outlier ratio,
    within ``sparsity +- lam``, averaging ``sparsity`` (unweighted mean over layers, as in the paper); pure."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    keep = torch.zeros_like(d) if spread == 0 else (d - d.min()) / spread * 2 * lam
    keep = keep - keep.mean() + (1.0 - sparsity)
    return [min(max(1.0 - float(k), 0.0), 1.0) for k in keep]


def outlier_ratio(scores: list, threshold: float) -> float:
    """Share of the scores (a layer's weights, several tensors) above ``threshold`` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


# -- calibration passes ----------------------------------------------------------------------------


def stats_hooks(modules: dict, kind: str, current: dict, stats: dict) -> list:
    """Forward pre-hooks adding each module's input to ``stats[name]``: summed squares per column (``"norms"``) or
    ``X^T X`` (``"hessian"``). Also used by the layer-by-layer path from disk (:mod:`.sequential`)."""
    def make(name):
        def hook(_m, args, kwargs):
            raw = args[0] if args else kwargs["input"]
            last = current.get("last")
            # q/k/v (gate/up) read one tensor: one sum for all of them (compared before .detach(), which makes a
            # new object), added to once per batch: 4 float64 Hessians per Llama layer instead of 7
            if last is not None and last[0] is raw:
                stats.setdefault(name, stats[last[1]])
                return
            x = raw.detach()
            current["last"] = (raw, name)
            if kind == "hessian":  # in place after the first batch: no second (in, in) float64 sum alive
                stats[name] = accumulate_hessian(stats.get(name), x, current["batch"])
            else:
                term = token_rows(x, current["batch"]).float().pow(2).sum(0)
                stats[name] = stats[name].add_(term) if name in stats else term
        return hook

    return [m.register_forward_pre_hook(make(name), with_kwargs=True) for name, m in modules.items()]


def column_norms(model: nn.Module, batches: list, targets: list) -> dict:
    """``{weight name: summed squared inputs per column}`` over ``batches`` in one pass of the unchanged model."""
    stats: dict = {}
    current: dict = {}
    handles = stats_hooks({t.name: t.module for t in targets}, "norms", current, stats)
    try:
        with torch.no_grad():
            for batch in iterate(batches, "input norms"):
                current.update(batch=batch, last=None)
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def layerwise(model: nn.Module, batches: list, groups: dict, kind: str, prune_layer) -> None:
    """For each stack, layer by layer: collect ``kind`` statistics (``"norms"`` / ``"hessian"``) of the inputs of
    that layer's targets (``groups``: ``{(stack, index): [targets]}``) on the hidden states the already-pruned
    layers produce, call ``prune_layer(targets, stats)`` (which changes the weights), then run the pruned layer to
    get the next layer's inputs. ``ValueError`` for stacks that cannot be replayed one layer at a time."""
    spec = get_adapter(model).arch_spec(model.config)
    use_cache = getattr(model.config, "use_cache", None)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        with torch.no_grad():
            try:
                check_replay(model, spec, batches[0], {})
            except ValueError as err:
                raise ValueError(f"{err} (hfprune.sparsify replays layers the same way for 'wanda' and 'sparsegpt': "
                                 "use 'magnitude' for this model)") from None
            for stack_key, _stack, layers in iter_stacks(model, spec):
                calls = [record_layer_calls(model, {stack_key: layers}, b)[stack_key] for b in batches]
                hidden = [layer_hidden(c[0]) for c in calls]
                for i, layer in enumerate(iterate(layers, f"sparsify {stack_key}")):
                    targets = groups.get((stack_key, i), [])
                    if targets:
                        stats: dict = {}
                        current: dict = {}
                        handles = stats_hooks({t.name: t.module for t in targets}, kind, current, stats)
                        try:
                            for h, c, batch in zip(hidden, calls, batches):
                                current.update(batch=batch, last=None)
                                run_layer(layer, h, c[i])
                        finally:
                            for handle in handles:
                                handle.remove()
                        prune_layer(targets, stats)
                    hidden = [run_layer(layer, h, c[i]) for h, c in zip(hidden, calls)]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def movement_scores(model: nn.Module, batches: list, targets: list) -> dict:
    """``{name: -sum dL/dW * W}`` over ``batches`` (which must give the model a loss: labels). Other parameters'
    gradients are not kept; the targets' ``.grad`` is restored afterwards."""
    weights = {t.name: t.module for t in targets}
    params = {name: base_layer(m).weight for name, m in weights.items()}
    saved = {name: (p.requires_grad, p.grad) for name, p in params.items()}
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params.values())]
    frozen = [p.requires_grad for p in others]
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    try:
        for p in others:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for batch in iterate(batches, "movement scores"):
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("criterion 'movement' needs batches that give the model a loss (with labels)")
            loss.backward()
            for name, p in params.items():
                scores[name] -= (p.grad * p.detach()).float()
                p.grad = None
    finally:
        for p, flag in zip(others, frozen):
            p.requires_grad_(flag)
        for name, p in params.items():
            p.requires_grad_(saved[name][0])
            p.grad = saved[name][1]
    # Conv1D stores (in, out): scores follow the (out, in) view of the targets
    return {t.name: scores[t.name].T if is_conv1d(base_layer(t.module)) else scores[t.name] for t in targets}

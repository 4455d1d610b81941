# Copyright hfprune contributors. Apache-2.0.
"""Gates on attention heads, FFN neurons and whole layers of a dense model, for scoring and training.

Head and neuron gates multiply the *input* of the block's output projection (``o`` / ``down``): that input
is the concatenation of per-head contexts (``heads * head_dim``) or the neuron activations, so a zero gate
removes exactly what slicing removes, and no gradient reaches the masked rows and columns. Gates are plain
tensors; give them ``requires_grad`` to score by gradient (Fisher, Taylor on gates).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .apply import as_plan, model_dims, unwrap
from .arch import get_adapter
from .blocks import iter_blocks, iter_layers
from .plan import ATTENTION_BLOCKS, PrunePlan


class Masks:
    """Gates for every prunable block of a model; ``attach()`` installs them, ``remove()`` takes them out.

    ``gates[(stack, layer, block)]`` is a 1-D tensor of ones (one per head or neuron); ``dropped`` holds
    ``(stack, layer)`` pairs whose layer acts as the identity.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from hfprune.core.masking import Masks
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64)).eval()
    >>> masks = Masks(model).attach()
    >>> masks.gates[("layers", 0, "heads")].tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> masks.remove()
    ```
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        self.model = unwrap(model)
        self.spec = get_adapter(self.model).arch_spec(self.model.config)
        device = next(self.model.parameters()).device
        self.gates: dict = {}
        self.dropped: set = set()
        for block in iter_blocks(self.model, self.spec):
            self.gates[block.key] = torch.ones(block.units, dtype=dtype, device=device)
        self._handles: list = []

    # -- plan <-> gates --------------------------------------------------------------------------

    def set_plan(self, plan: PrunePlan | dict) -> Masks:
        """Set gates to 1 for what ``plan`` keeps and 0 for what it removes."""
        plan = as_plan(plan)
        if plan.hidden is not None:  # norms over fewer channels are not a gate (hfprune.core.hidden)
            raise ValueError("masks gate heads, neurons and layers; a plan's 'hidden' channels are only sliced "
                             "(hfprune.apply_plan)")
        plan.validate(model_dims(self.model, self.spec))
        self.dropped = set()
        with torch.no_grad():
            for gate in self.gates.values():
                gate.fill_(1.0)
            for key, layers in plan.stacks().items():
                for i, layer in enumerate(layers):
                    if layer.drop:
                        self.dropped.add((key, i))
                        continue
                    for name, keep in layer.blocks.items():
                        if keep is not None:
                            gate = self.gates[(key, i, name)]
                            gate.zero_()
                            gate[list(keep)] = 1.0
        return self

    def to_plan(self) -> PrunePlan:
        """The plan the current gates describe (a gate counts as kept when nonzero)."""
        stacks: dict = {}
        for (key, i, name), gate in self.gates.items():
            layers = stacks.setdefault(key, {})
            entry = layers.setdefault(i, {})
            if (key, i) in self.dropped:
                layers[i] = {"drop": True}
                continue
            if "drop" in entry:
                continue
            kept = torch.nonzero(gate).flatten().tolist()
            entry[name] = None if len(kept) == len(gate) else kept
        return PrunePlan.from_dict(
            {key: [layers[i] for i in sorted(layers)] for key, layers in stacks.items()}
            | {"model_type": self.model.config.model_type}
        )

    # -- hooks ---------------------------------------------------------------------------------

    def attach(self) -> Masks:
        if self._handles:
            return self
        for block in iter_blocks(self.model, self.spec):
            if block.is_empty():  # an emptied block (EmptyAttention / EmptyFfn) has no projection and nothing to gate
                continue
            gate = self.gates[block.key]
            if block.is_expert:  # MoE: the router's logits (experts) or the experts' down columns (their neurons)
                from .experts import hook_expert_neurons, hook_router
                from .structure import get_module

                if block.kind == "experts":
                    self._handles.append(hook_router(get_module(block.layer, block.spec.router), block.spec, gate))
                else:
                    self._handles += hook_expert_neurons(block.module(), gate)
                continue
            self._hook_input(block.output_projection(), gate, block.width)
            if block.is_attention and block.spec.gate_query:
                self._hook_query(block.input_projections()[0], gate, block.width)
            if block.is_attention and block.spec.draws_rng:  # a fully masked module draws nothing, like EmptyAttention
                self._keep_rng(block.module(), lambda gate=gate: not bool(gate.any()))
        # hooks on the layers themselves (other modules than the blocks': registration order between them is moot)
        for key, i, layer, stack in iter_layers(self.model, self.spec):
            if any(attn.draws_rng for attn in stack.attention.values()):  # nor does a dropped layer
                self._keep_rng(layer, lambda key=key, i=i: (key, i) in self.dropped)
            self._handles.append(layer.register_forward_hook(self._identity_hook(key, i), with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_input(self, module: nn.Module, gate: torch.Tensor, width: int) -> None:
        def pre_hook(_module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            # (..., n * width) * (n * width): each head's head_dim slice (or each neuron) gets its gate
            scaled = x * gate.to(x.dtype).repeat_interleave(width)
            return ((scaled,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": scaled})

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def _hook_query(self, module: nn.Module, gate: torch.Tensor, width: int) -> None:
        # For modules that average query-key scores over heads (AttentionSpec.gate_query). Scores are linear in
        # the query, so scaling head h's query rows by gate_h * heads / sum(gate) turns the mean over all heads
        # into the gate-weighted mean: with 0/1 gates, exactly the mean over the kept heads that slicing computes.
        def hook(_module, _args, output):
            total = gate.sum()
            mean = torch.where(total > 0, total, torch.ones_like(total)) / len(gate)  # all masked: scale 0
            return output * (gate / mean).to(output.dtype).repeat_interleave(width)

        self._handles.append(module.register_forward_hook(hook))

    def _keep_rng(self, module: nn.Module, when) -> None:
        # While ``when()`` holds, the global RNG state is restored after ``module`` runs: a removed block has no
        # side effect on later random draws (AttentionSpec.draws_rng), as in the sliced model where it is gone.
        forks: list = []

        def pre_hook(_module, _args):
            fork = _fork_rng(module) if when() else None
            if fork is not None:
                fork.__enter__()
            forks.append(fork)

        def hook(_module, _args, _output):
            fork = forks.pop() if forks else None
            if fork is not None:
                fork.__exit__(None, None, None)

        self._handles.append(module.register_forward_pre_hook(pre_hook))
        self._handles.append(module.register_forward_hook(hook, always_call=True))

    def _identity_hook(self, key: str, i: int):
        def hook(_module, args, kwargs, output):
            if (key, i) not in self.dropped:
                return output
            hidden = args[0] if args else next(v for k, v in kwargs.items() if k.startswith("hidden"))
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # -- summaries -----------------------------------------------------------------------------

    def kept(self) -> dict:
        """Kept heads/neurons per block kind, summed over layers (dropped layers count as zero)."""
        out: dict = {}
        for (key, i, name), gate in self.gates.items():
            kind = "heads" if name in ATTENTION_BLOCKS else "neurons"
            n = 0 if (key, i) in self.dropped else int((gate != 0).sum())
            out[kind] = out.get(kind, 0) + n
        return out


def _fork_rng(module: nn.Module):
    """A ``torch.random.fork_rng`` context for the CPU generator and the one of ``module``'s accelerator."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


@contextmanager
def masked(model: nn.Module, plan: PrunePlan | dict):
    """Run ``model`` as if pruned to ``plan``, without touching its weights."""
    masks = Masks(model).set_plan(plan).attach()
    try:
        yield masks
    finally:
        masks.remove()

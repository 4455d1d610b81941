# Copyright hfprune contributors. Apache-2.0.
"""Part of the structure engine (see :mod:`hfprune.core.structure`): where a family keeps its attention, FFN, experts
and hidden-size sites, as data. Like every ``structure*`` file it imports only ``torch`` and its siblings: it is
copied into heterogeneous checkpoints under the same name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Quantities an attention module's attributes may be synced to after slicing.
QUANTITIES = ("heads", "kv_heads", "head_dim", "inner", "kv_inner", "groups")


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention block lives inside a layer, and how to keep it consistent after slicing.

    Paths are relative to the layer module. ``module`` is the attention module whose attributes are
    synced (``attrs``: attribute name -> one of :data:`QUANTITIES`) and which is replaced by an
    :class:`EmptyAttention` when no head remains (its ``-1`` head reshape cannot run at zero width).
    ``empty`` says what that replacement returns: ``"bias"`` when ``module`` contains the output
    projection (it returns that projection's bias, exactly what the fully masked block adds to the
    residual), ``"context"`` when the output projection sits outside ``module`` (it returns a zero-width
    context that the outer projection, sliced to zero input columns, maps to its bias).

    Two flags tell masking (``hfprune.core.masking``) what a gate on the output projection's input cannot express;
    slicing ignores them. ``gate_query``: the module averages query-key scores over all heads (Autoformer's
    autocorrelation picks its delays from that mean), so gates also scale the query rows, renormalised to a
    mean over the kept heads. ``draws_rng``: the module draws from the global RNG in forward (Informer's
    ProbSparse key sample); a fully masked one must draw nothing, like the :class:`EmptyAttention` that
    replaces it, so later draws stay aligned.
    """

    q: str
    k: str
    v: str
    o: str
    module: str
    head_dim_attr: str = "head_dim"
    attrs: dict = field(default_factory=dict)
    empty: str = "bias"
    returns: int = 2
    cache: bool = False
    fused_qkv: bool = False
    gate_query: bool = False
    draws_rng: bool = False


@dataclass(frozen=True)
class FfnSpec:
    """An FFN block: ``up`` projections (up and gate) lose output rows, ``down`` loses input columns.

    ``module`` names a block to replace by a bias-only :class:`EmptyFfn` at zero width, for modules that
    cannot run zero-width (GPT-2's ``Conv1D``); ``None`` keeps zero-width linears, which torch runs.
    """

    up: tuple
    down: str
    module: str | None = None


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts of a mixture-of-experts layer (transformers 5 keeps them as 3-D parameters, expert first).

    Plan blocks: ``experts`` keeps whole experts (the ``router``'s weight/bias rows and dim 0 of every parameter of
    the ``experts`` module); ``expert_ffn`` keeps neurons inside them, unit ``e * I + j`` being neuron ``j`` of
    expert ``e``, the same number in every kept expert. Only ``layout="gate_up"`` (``gate_up_proj`` (E, 2I, H) as
    [gate; up], ``down_proj`` (E, H, I)) prunes neurons. For masking, the router's routing from its logits:
    ``softmax`` ``"all"`` (over all experts, then top-k) or ``"top_k"`` (over the top-k logits); ``renormalize``
    (the top-k weights to sum 1): a bool, or the router attribute holding it (``norm_topk_prob``).
    """

    router: str
    experts: str
    layout: str | None = "gate_up"
    softmax: str = "all"
    renormalize: bool | str = True


@dataclass(frozen=True)
class StackSpec:
    """A stack of layers (``layers`` path relative to the base model) and its prunable blocks."""

    layers: str
    attention: dict = field(default_factory=dict)
    ffn: dict = field(default_factory=dict)
    num_layers_field: str | None = None
    per_layer_fields: tuple = ()
    droppable: bool = True
    experts: ExpertsSpec | None = None


@dataclass(frozen=True)
class HiddenSpec:
    """Where the residual stream's channels (the hidden size) live, for a plan's ``hidden`` keep-list.

    ``embeddings`` (columns) and ``norms`` (weight and bias) are paths relative to the base model; ``layer_norms``
    relative to each layer of stack ``stack``, whose attention and FFN specs name the projections that read the
    stream (q/k/v, up: input columns) and write it (o, down: output rows). ``readers``: base-model projections
    that read it (BERT's pooler). ``heads``: per model class name, the head projections (paths relative to that
    model) that read it; a class not listed cannot be pruned in hidden size. ``rms``: RMSNorms, whose statistics
    over ``k`` of ``H`` channels are folded (weights times sqrt(H/k), ``eps_attr`` times H/k) so that the sliced
    model equals the dense one with the removed channels zeroed.
    """

    stack: str = "layers"
    embeddings: tuple = ()
    norms: tuple = ()
    layer_norms: tuple = ()
    readers: tuple = ()
    heads: dict = field(default_factory=dict)
    rms: bool = False
    eps_attr: str = "eps"


@dataclass(frozen=True)
class ArchSpec:
    """Everything the engine needs to know about one model family. Plan keys name the stacks."""

    model_type: str
    stacks: dict
    hidden: HiddenSpec | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for stack in out["stacks"].values():
            if stack.get("experts") is None:
                stack.pop("experts", None)  # records without experts stay as earlier versions wrote them
        if self.hidden is None:
            del out["hidden"]  # records of families without it stay as earlier versions wrote them
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ArchSpec:
        if d.get("hidden") is not None:
            h = d["hidden"]
            hidden = HiddenSpec(**{**h, **{k: tuple(h.get(k, ())) for k in ("embeddings", "norms", "layer_norms",
                                                                              "readers")},
                                   "heads": {c: tuple(p) for c, p in h.get("heads", {}).items()}})
            return replace(cls.from_dict({k: v for k, v in d.items() if k != "hidden"}), hidden=hidden)
        stacks = {}
        for key, s in d["stacks"].items():
            attention = {name: AttentionSpec(**a) for name, a in s["attention"].items()}
            ffn = {name: FfnSpec(**{**f, "up": tuple(f["up"])}) for name, f in s["ffn"].items()}
            rest = {k: v for k, v in s.items() if k not in ("attention", "ffn")}
            rest["per_layer_fields"] = tuple(rest.get("per_layer_fields", ()))
            if rest.get("experts") is not None:
                rest["experts"] = ExpertsSpec(**rest["experts"])
            stacks[key] = StackSpec(attention=attention, ffn=ffn, **rest)
        return cls(model_type=d["model_type"], stacks=stacks)

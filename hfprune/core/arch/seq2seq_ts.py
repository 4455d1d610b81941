"""Encoder-decoder time-series transformers: TimeSeriesTransformer, Informer, Autoformer.

Encoder layers: self_attn + fc1/fc2. Decoder layers: self_attn, encoder_attn (``cross_heads``), fc1/fc2.
Informer and Autoformer attention reshape with `num_heads`/`embed_dim`, so both follow the kept heads.

Two families need more than a gate on the output projection's input for masking to equal slicing:

* Informer's ProbSparse self-attention (``attention_type="prob"``) draws its key sample from the global RNG
  in every forward. The sample does not depend on the head count (one draw of ``u_part`` key indices shared
  by all heads, and the top-u query selection is per head), so slicing heads is exact. But a head-less layer
  becomes an :class:`~hfprune.core.structure.EmptyAttention` and a dropped layer is gone, neither drawing, so
  ``draws_rng`` makes masking restore the RNG after such blocks: later layers then draw the same keys.
* Autoformer's autocorrelation picks its top-k delays, and their softmax weights, from the mean of the
  query-key autocorrelation over all heads and channels, so a pruned head's query and key still steer the
  kept heads. ``gate_query`` makes masking scale each head's query rows by ``gate * heads / sum(gate)``
  (the score is linear in the query): the mean then runs over the kept heads only, as in the sliced module.
  Caveat (transformers' own code, not fixable here): for batch size > 1 the module broadcasts the per-sample
  delays and weights with ``repeat(num_heads, ...)`` over a batch-major ``bsz * num_heads`` axis, so a head
  of sample b gets the delays of sample ``(b * num_heads + h) % bsz``: the dense model's outputs already
  depend on the other samples in the batch, and in a way that depends on the head count. Head pruning is
  exact per sample (batch size 1); FFN pruning and layer dropping are exact at any batch size.
"""

from ..plan import PlanError
from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, StackFields, register


def _attention(config, module: str) -> AttentionSpec:
    # Informer's cross-attention (`encoder_attn`) is always full attention; its self-attention may be ProbSparse.
    prob_sparse = (config.model_type == "informer" and module == "self_attn"
                   and getattr(config, "attention_type", "prob") == "prob")
    return AttentionSpec(
        q=f"{module}.q_proj", k=f"{module}.k_proj", v=f"{module}.v_proj", o=f"{module}.out_proj",
        module=module, attrs={"num_heads": "heads", "embed_dim": "inner"},
        gate_query=config.model_type == "autoformer", draws_rng=prob_sparse,
    )


def _spec(config) -> ArchSpec:
    ffn = {"ffn": FfnSpec(up=("fc1",), down="fc2")}
    # Informer's distilling conv layers sit between encoder layers: a dropped layer would unpair them.
    encoder_droppable = not (config.model_type == "informer" and getattr(config, "distil", False))
    encoder = StackSpec(layers="encoder.layers", attention={"heads": _attention(config, "self_attn")}, ffn=ffn,
                        num_layers_field="encoder_layers", droppable=encoder_droppable)
    # Autoformer decoder layers also emit a trend that is summed across layers: not droppable.
    decoder = StackSpec(
        layers="decoder.layers",
        attention={"heads": _attention(config, "self_attn"), "cross_heads": _attention(config, "encoder_attn")},
        ffn=ffn, num_layers_field="decoder_layers", droppable=config.model_type != "autoformer",
    )
    return ArchSpec(model_type=config.model_type, stacks={"layers": encoder, "decoder_layers": decoder})


def _check(config, plan) -> None:
    spec = _spec(config)
    for key, layers in plan.stacks().items():
        if any(layer.drop for layer in layers) and not spec.stacks[key].droppable:
            why = ("its distilling conv layers pair with encoder layers" if key == "layers"
                   else "each decoder layer adds to the trend")
            raise PlanError(f"{key}[*].drop: {config.model_type} cannot drop {key} ({why})")


register(Adapter(
    name="seq2seq_ts", model_types=("time_series_transformer", "informer", "autoformer"), spec=_spec, check=_check,
    fields={"layers": StackFields(ffn={"ffn": "encoder_ffn_dim"}),
            "decoder_layers": StackFields(ffn={"ffn": "decoder_ffn_dim"})},
))

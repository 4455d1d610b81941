"""Encoder-decoder time-series transformers: TimeSeriesTransformer, Informer, Autoformer.

Encoder layers: self_attn + fc1/fc2. Decoder layers: self_attn, encoder_attn (``cross_heads``), fc1/fc2.
Informer and Autoformer attention reshape with `num_heads`/`embed_dim`, so both follow the kept heads.
"""

from ..plan import PlanError
from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from . import Adapter, StackFields, register


def _attention(module: str) -> AttentionSpec:
    return AttentionSpec(
        q=f"{module}.q_proj", k=f"{module}.k_proj", v=f"{module}.v_proj", o=f"{module}.out_proj",
        module=module, attrs={"num_heads": "heads", "embed_dim": "inner"},
    )


def _spec(config) -> ArchSpec:
    ffn = {"ffn": FfnSpec(up=("fc1",), down="fc2")}
    # Informer's distilling conv layers sit between encoder layers: a dropped layer would unpair them.
    encoder_droppable = not (config.model_type == "informer" and getattr(config, "distil", False))
    encoder = StackSpec(layers="encoder.layers", attention={"heads": _attention("self_attn")}, ffn=ffn,
                        num_layers_field="encoder_layers", droppable=encoder_droppable)
    # Autoformer decoder layers also emit a trend that is summed across layers: not droppable.
    decoder = StackSpec(
        layers="decoder.layers",
        attention={"heads": _attention("self_attn"), "cross_heads": _attention("encoder_attn")},
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

"""PatchTSMixer: per layer a patch-mixer MLP (`patch_ffn`), a feature-mixer MLP (`ffn`), a channel-mixer
MLP in mode="mix_channel" (`channel_ffn`), and self-attention in the patch mixer when self_attn=True."""

from ..structure import ArchSpec, AttentionSpec, FfnSpec, StackSpec
from .base import Adapter, register


def _spec(config) -> ArchSpec:
    attention = {}
    if config.self_attn:
        attention["heads"] = AttentionSpec(
            q="patch_mixer.self_attn_layer.q_proj", k="patch_mixer.self_attn_layer.k_proj",
            v="patch_mixer.self_attn_layer.v_proj", o="patch_mixer.self_attn_layer.out_proj",
            module="patch_mixer.self_attn_layer", attrs={"num_heads": "heads", "embed_dim": "inner"},
        )
    ffn = {
        "ffn": FfnSpec(up=("feature_mixer.mlp.fc1",), down="feature_mixer.mlp.fc2"),
        "patch_ffn": FfnSpec(up=("patch_mixer.mlp.fc1",), down="patch_mixer.mlp.fc2"),
    }
    if config.mode == "mix_channel":
        ffn["channel_ffn"] = FfnSpec(up=("channel_feature_mixer.mlp.fc1",), down="channel_feature_mixer.mlp.fc2")
    layers = StackSpec(layers="encoder.mlp_mixer_encoder.mixers", attention=attention, ffn=ffn,
                       num_layers_field="num_layers")
    return ArchSpec(model_type=config.model_type, stacks={"layers": layers})


# Widths are d_model * expansion_factor in the config: no uniform plan is expressible there in general.
register(Adapter(name="patchtsmixer", model_types=("patchtsmixer",), spec=_spec))

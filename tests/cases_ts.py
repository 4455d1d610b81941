"""Cases for the time-series families."""

import torch
import transformers as T

from .cases import Case, register, seeded

# ----------------------------------------------------------------------------------------------
# PatchTST / PatchTSMixer: (batch, context, channels) in, a forecast out; `future_values` adds the loss.

CHANNELS, CONTEXT, PATCH, HORIZON = 3, 16, 4, 6


def _patched(seed: int, observed_key: str) -> dict:
    g = seeded(seed)
    observed = torch.ones(2, CONTEXT, CHANNELS)
    observed[1, :3, 0] = 0.0  # a few missing values in the second series
    return {"past_values": torch.randn(2, CONTEXT, CHANNELS, generator=g),
            observed_key: observed,
            "future_values": torch.randn(2, HORIZON, CHANNELS, generator=g)}


def _forecast(out):
    return (out.loss, out.prediction_outputs)


def _patchtst(attn=None):
    config = T.PatchTSTConfig(
        num_input_channels=CHANNELS, context_length=CONTEXT, patch_length=PATCH, patch_stride=PATCH,
        prediction_length=HORIZON, d_model=32, num_attention_heads=4, num_hidden_layers=3, ffn_dim=37,
        channel_attention=True,  # the same attention module runs twice per layer
        attention_dropout=0.0, positional_dropout=0.0, path_dropout=0.0, ff_dropout=0.0, head_dropout=0.0,
    )
    return T.PatchTSTForPrediction._from_config(config, attn_implementation=attn)


register(Case("patchtst", _patchtst, lambda seed: _patched(seed, "past_observed_mask"),
              attn_implementations=("eager", "sdpa"), outputs=_forecast))


def _patchtsmixer(attn=None):
    config = T.PatchTSMixerConfig(
        num_input_channels=CHANNELS, context_length=CONTEXT, patch_length=PATCH, patch_stride=PATCH,
        prediction_length=HORIZON, d_model=32, expansion_factor=2, num_layers=3, dropout=0.0, head_dropout=0.0,
        mode="mix_channel", self_attn=True, self_attn_heads=4, gated_attn=True,
    )
    return T.PatchTSMixerForPrediction._from_config(config, attn_implementation=attn)


# PatchTSMixer declares no sdpa support.
register(Case("patchtsmixer", _patchtsmixer, lambda seed: _patched(seed, "observed_mask"), outputs=_forecast))


# ----------------------------------------------------------------------------------------------
# Encoder-decoder forecasters: lagged past values with time features, a teacher-forced future window.

TS_CONTEXT, TS_HORIZON, TS_LAGS, TS_TIME_FEATURES = 12, 5, [1, 2, 3], 2


def _seq2seq_inputs(batch: int):
    def inputs(seed: int) -> dict:
        g = seeded(seed)
        past = TS_CONTEXT + max(TS_LAGS)
        observed = torch.ones(batch, past)
        observed[-1, :2] = 0.0
        return {
            "past_values": torch.randn(batch, past, generator=g).abs() + 0.5,
            "past_time_features": torch.randn(batch, past, TS_TIME_FEATURES, generator=g),
            "past_observed_mask": observed,
            "future_values": torch.randn(batch, TS_HORIZON, generator=g).abs() + 0.5,
            "future_time_features": torch.randn(batch, TS_HORIZON, TS_TIME_FEATURES, generator=g),
        }

    return inputs


def _distribution(out):
    return (out.loss, out.params)  # negative log-likelihood and the distribution parameters


_SEQ2SEQ = dict(
    prediction_length=TS_HORIZON, context_length=TS_CONTEXT, lags_sequence=TS_LAGS,
    num_time_features=TS_TIME_FEATURES, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_layers=3, decoder_layers=3, encoder_ffn_dim=37, decoder_ffn_dim=37, dropout=0.0,
    encoder_layerdrop=0.0, decoder_layerdrop=0.0, attention_dropout=0.0, activation_dropout=0.0,
)


def _time_series_transformer(attn=None):
    config = T.TimeSeriesTransformerConfig(**_SEQ2SEQ)
    return T.TimeSeriesTransformerForPrediction._from_config(config, attn_implementation=attn)


def _informer(attn=None):
    # ProbSparse attention with sampling_factor=2 is really sparse at these lengths (it attends with the
    # top-u queries only, u < length) and draws its key sample from the global RNG in every forward.
    # distil=True keeps the distilling conv layers (so the encoder stack is not droppable).
    config = T.InformerConfig(**_SEQ2SEQ, attention_type="prob", sampling_factor=2, distil=True)
    return T.InformerForPrediction._from_config(config, attn_implementation=attn)


def _autoformer(attn=None):
    config = T.AutoformerConfig(**_SEQ2SEQ, label_length=6, moving_average=5, autocorrelation_factor=2)
    return T.AutoformerForPrediction._from_config(config, attn_implementation=attn)


# None of the three declares sdpa support.
register(Case("time_series_transformer", _time_series_transformer, _seq2seq_inputs(2), outputs=_distribution))
register(Case("informer", _informer, _seq2seq_inputs(2), outputs=_distribution))
# Batch size 1 for Autoformer: with several heads, transformers' autocorrelation broadcasts each sample's
# delays and weights onto the wrong rows of its batch-major (batch * heads) axis, so with batch > 1 a sample's
# output depends on the other samples, through a layout that depends on the head count. Head pruning is exact
# per sample only (see hfprune/arch/seq2seq_ts.py).
register(Case("autoformer", _autoformer, _seq2seq_inputs(1), outputs=_distribution))


# ----------------------------------------------------------------------------------------------
# TimesFM: a list of 1-D series of different lengths (the short one is front-padded), one frequency each.

def _timesfm(attn=None):
    config = T.TimesFmConfig(patch_length=4, context_length=16, horizon_length=8, hidden_size=32,
                             intermediate_size=37, head_dim=8, num_attention_heads=4, num_hidden_layers=3,
                             attention_dropout=0.0)
    return T.TimesFmModelForPrediction._from_config(config, attn_implementation=attn)


def _series(seed: int) -> dict:
    g = seeded(seed)
    return {"past_values": [torch.randn(16, generator=g), torch.randn(11, generator=g)], "freq": [0, 2],
            "future_values": torch.randn(2, 8, generator=g)}


register(Case("timesfm", _timesfm, _series, attn_implementations=("eager", "sdpa"),
              outputs=lambda out: (out.loss, out.full_predictions)))

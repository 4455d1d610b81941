"""Point forecasts, predictive distributions and the forecast distillation loss for every family's output."""

import math
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from torch import distributions as D

from hfprune.forecast import (
    channel_series,
    distribution_kind,
    distribution_kl,
    forecast_distill_loss,
    forecast_distribution,
    greedy_forecast,
    point_forecast,
    reads_no_future,
    seasonal_naive,
)

B, CONTEXT, HORIZON, C = 3, 16, 6, 2
LAGS = [1, 2, 3]


def _patched(loss="mse", distribution="student_t", mixer=False):
    common = dict(num_input_channels=C, context_length=CONTEXT, patch_length=4, patch_stride=4,
                  prediction_length=HORIZON, d_model=16, loss=loss, distribution_output=distribution)
    torch.manual_seed(0)
    if mixer:
        return T.PatchTSMixerForPrediction(T.PatchTSMixerConfig(**common, num_layers=1)).eval()
    return T.PatchTSTForPrediction(T.PatchTSTConfig(**common, num_attention_heads=2, num_hidden_layers=1,
                                                    ffn_dim=8)).eval()


def _seq2seq(cls=T.TimeSeriesTransformerForPrediction, config_cls=T.TimeSeriesTransformerConfig, input_size=1,
             distribution="student_t", lags_sequence=LAGS, **extra):
    torch.manual_seed(0)
    config = config_cls(input_size=input_size, prediction_length=HORIZON, context_length=CONTEXT,
                        lags_sequence=lags_sequence, num_time_features=1, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        distribution_output=distribution,
                        **extra)
    return cls(config).eval()


def _patched_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"past_values": torch.randn(B, CONTEXT, C, generator=g),
            "future_values": torch.randn(B, HORIZON, C, generator=g)}


def _seq2seq_batch(input_size=1, seed=0, lags=LAGS):
    g = torch.Generator().manual_seed(seed)
    past = CONTEXT + max(lags)
    shape = (B, past) if input_size == 1 else (B, past, input_size)
    future = (B, HORIZON) if input_size == 1 else (B, HORIZON, input_size)
    return {"past_values": torch.randn(*shape, generator=g).abs() + 1, "past_observed_mask": torch.ones(*shape),
            "past_time_features": torch.randn(B, past, 1, generator=g),
            "future_values": torch.randn(*future, generator=g).abs() + 1,
            "future_time_features": torch.randn(B, HORIZON, 1, generator=g)}


def test_point_head_forecast_is_the_models_prediction():
    model = _patched()
    out = model(**_patched_batch())
    assert distribution_kind(model) is None
    assert forecast_distribution(out) is None
    torch.testing.assert_close(point_forecast(out), out.prediction_outputs)


@pytest.mark.parametrize("mixer", [False, True])
@pytest.mark.parametrize("kind", ["student_t", "normal"])
def test_patch_distribution_heads_match_transformers(mixer, kind):
    model = _patched(loss="nll", distribution=kind, mixer=mixer)
    out = model(**_patched_batch())
    assert distribution_kind(model) == kind
    ours = forecast_distribution(out, kind)
    theirs = model.distribution_output.distribution(out.prediction_outputs, loc=out.loc, scale=out.scale)
    torch.testing.assert_close(ours.mean, theirs.mean)
    torch.testing.assert_close(point_forecast(out, kind), theirs.mean)
    target = _patched_batch()["future_values"]
    # the model's loss is the negative log-likelihood summed over its event axis (the last), averaged over the
    # rest; ours is element-wise and gives the same number
    torch.testing.assert_close(-ours.log_prob(target).sum(-1).mean(), out.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,config_cls,extra", [
    (T.TimeSeriesTransformerForPrediction, T.TimeSeriesTransformerConfig, {}),
    (T.InformerForPrediction, T.InformerConfig, {}),
    (T.AutoformerForPrediction, T.AutoformerConfig, {"label_length": 4}),
])
def test_seq2seq_distribution_matches_the_models_loss(cls, config_cls, extra):
    model = _seq2seq(cls, config_cls, **extra)
    batch = _seq2seq_batch()
    out = model(**batch)
    dist = forecast_distribution(out)  # StudentT, inferred from its 3 parameters
    assert isinstance(dist, D.StudentT) and dist.mean.shape == (B, HORIZON)
    torch.testing.assert_close(-dist.log_prob(batch["future_values"]).mean(), out.loss, rtol=1e-5, atol=1e-5)
    theirs = model.output_distribution(out.params, loc=out.loc, scale=out.scale)
    torch.testing.assert_close(point_forecast(out), theirs.mean)


def test_multivariate_seq2seq_sums_channels_like_the_model():
    model = _seq2seq(input_size=C)
    batch = _seq2seq_batch(input_size=C)
    out = model(**batch)
    nll = -forecast_distribution(out).log_prob(batch["future_values"])  # (B, H, C), element-wise
    assert nll.shape == (B, HORIZON, C)
    torch.testing.assert_close(nll.sum(-1).mean(), out.loss, rtol=1e-5, atol=1e-5)


def test_generate_samples_give_their_mean():
    model = _seq2seq()
    batch = _seq2seq_batch()
    batch.pop("future_values")
    torch.manual_seed(0)
    out = model.generate(**batch)
    torch.testing.assert_close(point_forecast(out), out.sequences.mean(1))


@pytest.mark.parametrize("input_size", [1, C])
def test_greedy_forecast_is_a_fixed_point_of_the_teacher_forced_means(input_size):
    model = _seq2seq(input_size=input_size)
    batch = _seq2seq_batch(input_size=input_size)
    forecast = greedy_forecast(model, batch)
    assert forecast.shape == batch["future_values"].shape
    # fed its own forecast, the causal decoder predicts exactly that forecast at every step
    again = point_forecast(model(**{**batch, "future_values": forecast}))
    torch.testing.assert_close(again, forecast, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="greedy_forecast supports"):
        greedy_forecast(_patched(), _patched_batch())


SEQ2SEQ = {
    "time_series_transformer": (T.TimeSeriesTransformerForPrediction, T.TimeSeriesTransformerConfig, {}),
    "informer": (T.InformerForPrediction, T.InformerConfig, {"attention_type": "full"}),  # ProbSparse samples keys
    "autoformer": (T.AutoformerForPrediction, T.AutoformerConfig, {"label_length": 4}),
    # shortest lag >= horizon: greedy_forecast takes its single-pass path
    "time_series_transformer, seasonal lags": (T.TimeSeriesTransformerForPrediction, T.TimeSeriesTransformerConfig,
                                               {"lags_sequence": [HORIZON, HORIZON + 1]}),
}


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
@pytest.mark.parametrize("input_size", [1, C])
def test_greedy_forecast_is_generate_with_every_sample_replaced_by_its_mean(family, input_size, monkeypatch):
    """transformers' own ``generate`` decodes these families; with the sampling step made to return the
    distribution's mean it walks the mean path, which greedy_forecast must reproduce."""
    from transformers.time_series_utils import AffineTransformed

    cls, config_cls, extra = SEQ2SEQ[family]
    extra = {"lags_sequence": LAGS, **extra}
    model = _seq2seq(cls, config_cls, input_size=input_size, num_parallel_samples=1, **extra)
    batch = _seq2seq_batch(input_size=input_size, lags=extra["lags_sequence"])
    assert reads_no_future(model.config) == ("seasonal lags" in family)
    forecast = greedy_forecast(model, batch)
    monkeypatch.setattr(AffineTransformed, "sample", lambda self, sample_shape=(): self.mean)
    inputs = {k: v for k, v in batch.items() if k != "future_values"}
    with torch.no_grad():
        expected = model.generate(**inputs).sequences[:, 0]
    assert forecast.shape == batch["future_values"].shape
    torch.testing.assert_close(forecast, expected, rtol=1e-5, atol=1e-5)


def test_reads_no_future_needs_every_lag_at_least_the_horizon():
    config = T.TimeSeriesTransformerConfig(prediction_length=HORIZON, lags_sequence=[HORIZON - 1, HORIZON])
    assert not reads_no_future(config)  # lag H-1: the last horizon step reads the first
    config.lags_sequence = [HORIZON, 2 * HORIZON]
    assert reads_no_future(config)
    assert not reads_no_future(T.PatchTSTConfig(prediction_length=HORIZON))  # no lags: not a lag-based decoder


def test_channel_series_keeps_each_channel_whole():
    x = torch.arange(2 * 3 * 2).reshape(2, 3, 2)  # (windows, time, channels)
    assert channel_series(x).tolist() == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert channel_series(x[..., 0]).tolist() == [[0, 2, 4], [6, 8, 10]]
    with pytest.raises(ValueError, match="expected"):
        channel_series(x[0, 0])


def test_two_parameter_heads_need_the_name_and_negative_binomial_is_refused():
    out = _seq2seq(distribution="normal")(**_seq2seq_batch())
    with pytest.raises(ValueError, match="ambiguous"):
        forecast_distribution(out)
    with pytest.raises(ValueError, match="takes 3 parameters"):
        forecast_distribution(out, "student_t")
    assert isinstance(forecast_distribution(out, "normal"), D.Normal)
    model = _seq2seq(distribution="negative_binomial")
    counts = {**_seq2seq_batch(), "future_values": _seq2seq_batch()["future_values"].round()}
    with pytest.raises(ValueError, match="not supported"):
        forecast_distribution(model(**counts), distribution_kind(model))


def test_timesfm_forecast_and_quantile_distillation():
    torch.manual_seed(0)
    model = T.TimesFmModelForPrediction(T.TimesFmConfig(
        patch_length=4, context_length=CONTEXT, horizon_length=HORIZON, hidden_size=16, intermediate_size=8,
        head_dim=8, num_attention_heads=2, num_hidden_layers=1)).eval()
    batch = {"past_values": torch.randn(4, CONTEXT), "freq": torch.zeros(4, dtype=torch.long)}
    out = model(**batch)
    torch.testing.assert_close(point_forecast(out), out.mean_predictions)
    shifted = SimpleNamespace(full_predictions=out.full_predictions + 0.5, mean_predictions=None)
    assert float(forecast_distill_loss(shifted, out, batch)) == pytest.approx(0.25)  # every quantile counts


# ---- the distillation loss -------------------------------------------------------------------------------------

def _point(x):
    return SimpleNamespace(prediction_outputs=x)


def test_point_distillation_is_masked_mse_to_the_teacher():
    teacher = torch.zeros(B, HORIZON, C)
    student = torch.ones(B, HORIZON, C, requires_grad=True)
    teacher_out = _point(teacher.clone().requires_grad_(True))
    loss = forecast_distill_loss(_point(student), teacher_out, {})
    assert float(loss) == pytest.approx(1.0)
    loss.backward()
    assert student.grad is not None and teacher_out.prediction_outputs.grad is None  # the teacher is a target
    mask = torch.ones(B, HORIZON)
    mask[:, 2:] = 0
    student2 = torch.zeros(B, HORIZON, C)
    student2[:, 2:] = 10.0  # errors only where the mask hides them
    assert float(forecast_distill_loss(_point(student2), _point(teacher), {"future_observed_mask": mask})) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        forecast_distill_loss(_point(torch.zeros(B, HORIZON)), _point(teacher), {})


def _normal_out(mu, sigma):
    return SimpleNamespace(params=(mu, sigma), loc=None, scale=None)


def test_normal_heads_use_the_analytic_kl():
    mu_t, sigma_t = torch.zeros(B, HORIZON), torch.ones(B, HORIZON)
    mu_s = torch.full((B, HORIZON), 1.0, requires_grad=True)
    sigma_s = torch.full((B, HORIZON), 2.0)
    loss = forecast_distill_loss(_normal_out(mu_s, sigma_s), _normal_out(mu_t, sigma_t), {}, distribution="normal")
    expected = math.log(2.0) + (1.0 + 1.0) / (2 * 4.0) - 0.5  # KL(N(0,1) || N(1,4))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert mu_s.grad is not None and (mu_s.grad > 0).all()  # pulls the student's mean toward the teacher's
    same = forecast_distill_loss(_normal_out(mu_t, sigma_t), _normal_out(mu_t, sigma_t), {}, distribution="normal")
    assert float(same) == 0.0


def test_student_t_kl_is_a_monte_carlo_estimate():
    shape = (400, 50)
    teacher = D.StudentT(torch.full(shape, 1e4), torch.zeros(shape), torch.ones(shape))  # ~ N(0, 1)
    student = D.StudentT(torch.full(shape, 1e4), torch.ones(shape), torch.ones(shape))  # ~ N(1, 1)
    torch.manual_seed(0)
    kl = distribution_kl(student, teacher, num_samples=4)
    assert kl.shape == shape
    assert float(kl.mean()) == pytest.approx(0.5, abs=0.02)  # KL(N(0,1) || N(1,1)) = 1/2
    assert float(distribution_kl(teacher, teacher).abs().max()) == 0.0


def test_distribution_student_of_point_teacher_uses_nll():
    mu = torch.zeros(B, HORIZON, requires_grad=True)
    student = _normal_out(mu, torch.ones(B, HORIZON))
    teacher = _point(torch.zeros(B, HORIZON))
    loss = forecast_distill_loss(student, teacher, {}, distribution="normal")
    assert float(loss) == pytest.approx(0.5 * math.log(2 * math.pi))
    # and a point student of a distribution teacher regresses onto the teacher's mean
    point = forecast_distill_loss(_point(torch.zeros(B, HORIZON)), _normal_out(torch.ones(B, HORIZON),
                                  torch.ones(B, HORIZON)), {}, distribution="normal")
    assert float(point) == pytest.approx(1.0)


def test_real_models_distil_to_zero_against_themselves_and_positive_otherwise():
    batch = _seq2seq_batch()
    teacher = _seq2seq()
    student = _seq2seq()
    for p in student.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    t_out, s_out = teacher(**batch), student(**batch)
    torch.manual_seed(0)
    assert float(forecast_distill_loss(t_out, t_out, batch)) == 0.0
    loss = forecast_distill_loss(s_out, t_out, batch)
    assert float(loss) > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_seasonal_naive_repeats_the_last_season():
    past = torch.arange(10.0).reshape(1, 10, 1)
    assert seasonal_naive(past, 5, 3)[0, :, 0].tolist() == [7.0, 8.0, 9.0, 7.0, 8.0]
    with pytest.raises(ValueError, match="season"):
        seasonal_naive(past, 5, 11)


def test_unknown_output_and_distribution_names_are_rejected():
    with pytest.raises(ValueError, match="holds no forecast"):
        point_forecast(SimpleNamespace())
    with pytest.raises(ValueError, match="supported"):
        forecast_distribution(_normal_out(torch.zeros(1), torch.ones(1)), "gamma")

# Copyright hfprune contributors. Apache-2.0.
"""Forecasts out of each time-series family's output, and the forecast distillation loss. Pure functions.

What each family returns (transformers 5.23):

* PatchTST / PatchTSMixer ``...ForPrediction``: ``prediction_outputs`` is the point forecast (B, H, C) with the
  default ``loss="mse"``; with ``loss="nll"`` it is the tuple of distribution parameters, still to be moved by
  ``loc`` / ``scale``.
* TimeSeriesTransformer / Informer / Autoformer: ``params`` (tuple, teacher-forced, present when
  ``future_values`` was given) with ``loc`` / ``scale``; ``generate`` returns ``sequences`` (B, S, H[, C]).
* TimesFM: ``mean_predictions`` (B, H) and ``full_predictions`` (B, H, 1 + quantiles).

Distribution heads: StudentT (3 parameters: df, loc, scale) and Normal (loc, scale). The output does not say
which 2-parameter family it holds, so Normal heads need ``distribution="normal"`` (see :func:`distribution_kind`).
NegativeBinomial heads are refused (see :func:`_resolve`).
"""

from __future__ import annotations

import torch
from torch import distributions as D

DISTRIBUTIONS = ("student_t", "normal", "negative_binomial")


def distribution_kind(model) -> str | None:
    """The distribution head of ``model`` (one of :data:`DISTRIBUTIONS`), or None for a point head."""
    config = getattr(model, "config", model)
    if config.model_type in ("patchtst", "patchtsmixer") and getattr(config, "loss", "mse") == "mse":
        return None
    if config.model_type == "timesfm":
        return None
    kind = getattr(config, "distribution_output", None)
    if kind is not None and kind not in DISTRIBUTIONS:
        raise ValueError(f"distribution_output={kind!r}; supported: {DISTRIBUTIONS}")
    return kind


def _params(output):
    """The distribution parameters of ``output``, or None for a point forecast."""
    params = getattr(output, "params", None)
    if params is None and isinstance(getattr(output, "prediction_outputs", None), (tuple, list)):
        params = output.prediction_outputs
    return tuple(params) if params is not None else None


def _resolve(params: tuple, distribution: str | None) -> str:
    if distribution == "negative_binomial":
        # transformers' NegativeBinomialOutput.distribution adds log(scale) to the logits in place, and the
        # models call it only when future_values is given: the output alone does not say whether its logits
        # are already scaled.
        raise ValueError("negative_binomial heads are not supported: their output logits are scaled in place by "
                         "transformers only when future_values is given, so the output is ambiguous")
    if distribution is not None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r}; supported: {DISTRIBUTIONS}")
        expected = 3 if distribution == "student_t" else 2
        if len(params) != expected:
            raise ValueError(f"distribution={distribution!r} takes {expected} parameters, the output has "
                             f"{len(params)}")
        return distribution
    if len(params) == 3:
        return "student_t"
    raise ValueError(f"a {len(params)}-parameter distribution head is ambiguous (normal or negative_binomial): "
                     "pass distribution= (hfprune.forecast.distribution_kind(model) tells)")


def forecast_distribution(output, distribution: str | None = None) -> D.Distribution | None:
    """The predictive distribution of a distribution head, element-wise over (B, H[, C]); None for point heads.

    Built in closed form rather than with transformers' ``DistributionOutput``: an affine map of a StudentT or
    Normal is again one, so the Normal-Normal KL stays analytic.
    """
    params = _params(output)
    if params is None:
        return None
    kind = _resolve(params, distribution)
    loc = getattr(output, "loc", None)
    scale = getattr(output, "scale", None)
    shift = 0.0 if loc is None else loc
    mult = 1.0 if scale is None else scale
    if kind == "normal":
        mu, sigma = params
        return D.Normal(mu * mult + shift, sigma * mult)
    df, mu, sigma = params
    return D.StudentT(df, mu * mult + shift, sigma * mult)


def point_forecast(output, distribution: str | None = None) -> torch.Tensor:
    """The point forecast in ``output``: the forecast itself, a distribution's mean, or the mean of samples."""
    mean = getattr(output, "mean_predictions", None)
    if mean is not None:
        return mean
    sequences = getattr(output, "sequences", None)
    if sequences is not None:  # (B, S, H[, C]) samples from generate()
        return sequences.mean(dim=1)
    dist = forecast_distribution(output, distribution)
    if dist is not None:
        return dist.mean
    pred = getattr(output, "prediction_outputs", None)
    if pred is None:
        raise ValueError(f"{type(output).__name__} holds no forecast (expected prediction_outputs, params, "
                         "mean_predictions or sequences)")
    return pred


def _weights(batch, like: torch.Tensor) -> torch.Tensor:
    mask = batch.get("future_observed_mask") if batch is not None else None
    if mask is None:
        return torch.ones_like(like)
    mask = mask.to(like.dtype)
    while mask.dim() < like.dim():
        mask = mask.unsqueeze(-1)
    return mask.expand_as(like)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher {what} differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")


def distribution_kl(student: D.Distribution, teacher: D.Distribution, num_samples: int = 16) -> torch.Tensor:
    """Element-wise KL(teacher || student): analytic where torch has it (Normal), otherwise the Monte Carlo
    estimate ``mean_s [log p_t(y_s) - log p_s(y_s)]`` over ``num_samples`` draws ``y_s`` from the teacher."""
    try:
        return D.kl_divergence(teacher, student)
    except NotImplementedError:
        pass
    with torch.no_grad():  # the samples are targets: no gradient flows through them
        samples = teacher.sample((num_samples,))  # (S, B, H[, C]); torch's global RNG
        teacher_logp = teacher.log_prob(samples)
    return (teacher_logp - student.log_prob(samples)).mean(0)


def forecast_distill_loss(student_out, teacher_out, batch: dict | None = None, *, distribution: str | None = None,
                          num_samples: int = 16) -> torch.Tensor:
    """Distillation loss between a student's and a teacher's forecasts (the teacher side is detached).

    * both distribution heads: KL(teacher || student) per forecast element (see :func:`distribution_kl`);
    * point heads: MSE to the teacher's point forecast (TimesFM: to its mean and quantile forecasts);
    * a distribution student of a point teacher: negative log-likelihood of the teacher's forecast; a point
      student of a distribution teacher: MSE to the teacher's mean.

    Elements where ``batch["future_observed_mask"]`` is 0 are left out of the mean. ``distribution`` names the
    2-parameter heads (both models must share it).

    Example:

    ```python
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from hfprune.forecast import forecast_distill_loss
    >>> teacher = SimpleNamespace(prediction_outputs=torch.ones(2, 4, 3))
    >>> student = SimpleNamespace(prediction_outputs=torch.zeros(2, 4, 3, requires_grad=True))
    >>> float(forecast_distill_loss(student, teacher, {}))
    1.0
    ```
    """
    s_full, t_full = getattr(student_out, "full_predictions", None), getattr(teacher_out, "full_predictions", None)
    if s_full is not None and t_full is not None:  # TimesFM: mean and quantiles are all point outputs
        _same_shape(s_full, t_full, "full_predictions")
        return _weighted_mean((s_full - t_full.detach()) ** 2, _weights(batch, s_full))
    s_dist = forecast_distribution(student_out, distribution)
    t_dist = forecast_distribution(teacher_out, distribution)
    if s_dist is not None and t_dist is not None:
        t_dist = _detached(t_dist)
        _same_shape(s_dist.mean, t_dist.mean, "forecasts")
        kl = distribution_kl(s_dist, t_dist, num_samples)
        return _weighted_mean(kl, _weights(batch, kl))
    if s_dist is not None:
        target = point_forecast(teacher_out, distribution).detach()
        _same_shape(s_dist.mean, target, "forecasts")
        nll = -s_dist.log_prob(target)
        return _weighted_mean(nll, _weights(batch, nll))
    student = point_forecast(student_out, distribution)
    teacher = point_forecast(teacher_out, distribution).detach()
    _same_shape(student, teacher, "forecasts")
    return _weighted_mean((student - teacher) ** 2, _weights(batch, student))


def _detached(dist: D.Distribution) -> D.Distribution:
    if isinstance(dist, D.StudentT):
        return D.StudentT(dist.df.detach(), dist.loc.detach(), dist.scale.detach())
    return D.Normal(dist.loc.detach(), dist.scale.detach())


def seasonal_naive(past: torch.Tensor, horizon: int, season: int) -> torch.Tensor:
    """Repeat the last ``season`` steps of ``past`` (B, T[, C]) over ``horizon`` steps: (B, horizon[, C])."""
    if not 1 <= season <= past.shape[1]:
        raise ValueError(f"season={season} must be in [1, {past.shape[1]}] (the past length)")
    last = past[:, -season:]
    reps = -(-horizon // season)
    return torch.cat([last] * reps, dim=1)[:, :horizon]


GREEDY_FAMILIES = ("time_series_transformer", "informer", "autoformer")


def channel_series(x: torch.Tensor) -> torch.Tensor:
    """Forecast arrays as one row per series for the per-series metrics (MASE): (B, T) stays, (B, T, C) becomes
    (B * C, T), window-major. Flattening (B, T, C) row-wise instead would interleave the channels in time."""
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"expected (batch, time) or (batch, time, channels), got shape {tuple(x.shape)}")
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def reads_no_future(config) -> bool:
    """Whether a lag-based seq2seq decoder never reads a horizon value: every lag reaches back to or before the
    last observed step, so teacher-forced training sees exactly the inputs inference has (no exposure bias) and
    one decoder pass gives the whole forecast."""
    lags = getattr(config, "lags_sequence", None)
    return bool(lags) and min(lags) >= config.prediction_length


@torch.no_grad()
def greedy_forecast(model, batch: dict, distribution: str | None = None) -> torch.Tensor:
    """Deterministic forecast of a seq2seq forecaster from the past alone.

    TimeSeriesTransformer and Informer decode autoregressively: horizon step k is the predictive mean given steps
    < k filled with their own means (one decoder pass per step; the encoder runs once). This is the mean path, not
    the mean over sampled paths that ``generate`` estimates: it has no sampling noise and costs one decoder pass
    per step instead of ``num_parallel_samples``. (Informer with ProbSparse attention samples keys at random in
    every pass, so its forecast is only as deterministic as the model.) Autoformer decodes the whole horizon in
    one pass from the context (its future values only enter the loss), so its forecast is that pass's mean.
    The same single pass is exact for a TimeSeriesTransformer or Informer whose shortest lag is at least the
    horizon (e.g. ``lags_sequence=[48]`` for a 48-step forecast): no step then reads an earlier step's value.
    ``batch`` is the model's inference batch (``future_values`` is ignored); returns (B, H) or (B, H, C).
    """
    if model.config.model_type not in GREEDY_FAMILIES:
        raise ValueError(f"greedy_forecast supports {GREEDY_FAMILIES}, not {model.config.model_type!r}")
    inputs = {k: v for k, v in batch.items() if k != "future_values"}
    past = inputs["past_values"]
    horizon = model.config.prediction_length
    # unknown steps hold 0: the causal decoder reads step j only through the lags of steps > j
    future = past.new_zeros((past.shape[0], horizon) + tuple(past.shape[2:]))
    if model.config.model_type == "autoformer" or reads_no_future(model.config):
        return point_forecast(model(**inputs, future_values=future), distribution)
    encoder = None
    for k in range(horizon):
        out = model(**inputs, future_values=future, encoder_outputs=encoder)
        if encoder is None:
            encoder = (out.encoder_last_hidden_state,)
        future = future.clone()
        future[:, k] = point_forecast(out, distribution)[:, k]
    return future

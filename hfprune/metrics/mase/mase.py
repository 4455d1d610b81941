# Copyright hfprune contributors. Apache-2.0.
"""Mean absolute scaled error as a local ``evaluate`` module: works offline (``evaluate.load(<this folder>)``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """MASE (Hyndman & Koehler, 2006): a forecast's mean absolute error divided by the in-sample mean
absolute error of the seasonal naive forecast (y[t] predicted by y[t - periodicity]) on the series' own history.
Below 1 the forecast beats the seasonal naive one. Computed per series, then averaged over series."""
_INPUTS = """
Args:
    predictions (list of lists of float): one forecast window per series.
    references (list of lists of float): the true future values, same shapes.
    training (list of lists of float): each series' history (context) the naive scale is measured on.
    periodicity (int, default 1): the seasonal lag m (e.g. 48 for half-hourly data with a daily season).
Returns:
    mase (float)
Examples:
    >>> metric = evaluate.load("hfprune/metrics/mase")
    >>> metric.compute(predictions=[[3.0, 5.0]], references=[[4.0, 4.0]], training=[[1.0, 2.0, 3.0]])
    {'mase': 1.0}
"""

_FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                               "references": datasets.Sequence(datasets.Value("float64"))})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Mase(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=_FEATURES)

    def _compute(self, predictions, references, training, periodicity=1):
        if len(training) != len(predictions):
            raise ValueError(f"training has {len(training)} series but predictions has {len(predictions)}")
        if periodicity < 1:
            raise ValueError(f"periodicity={periodicity} must be >= 1")
        ratios = []
        for pred, ref, hist in zip(predictions, references, training):
            hist = np.asarray(hist, dtype=np.float64)
            if hist.shape[0] <= periodicity:
                raise ValueError(f"a training series of length {hist.shape[0]} is too short for periodicity "
                                 f"{periodicity}")
            scale = np.mean(np.abs(hist[periodicity:] - hist[:-periodicity]))
            err = np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)))
            # A constant history has no naive error to scale by: report infinity rather than divide by zero.
            ratios.append(err / scale if scale > 0 else float("inf"))
        return {"mase": float(np.mean(ratios))}

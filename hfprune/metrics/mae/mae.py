# Copyright hfprune contributors. Apache-2.0.
"""Mean absolute error as a local ``evaluate`` module: works offline (``evaluate.load(<this folder>)``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean of the absolute differences between predictions and references, over every value."
_INPUTS = """
Args:
    predictions (list of float, or list of lists of float): predicted values (e.g. one forecast window per row).
    references (same shape as predictions): true values.
Returns:
    mae (float)
Examples:
    >>> metric = evaluate.load("hfprune/metrics/mae")
    >>> metric.compute(predictions=[[1.0, 2.0]], references=[[1.0, 4.0]])
    {'mae': 1.0}
"""

_SCALAR = datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")})
_ROWS = datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                           "references": datasets.Sequence(datasets.Value("float64"))})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Mae(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=[_SCALAR, _ROWS])

    def _compute(self, predictions, references):
        diff = np.concatenate([np.ravel(np.asarray(p, dtype=np.float64) - np.asarray(r, dtype=np.float64))
                               for p, r in zip(predictions, references)])
        return {"mae": float(np.mean(np.abs(diff)))}

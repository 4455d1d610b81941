# Copyright hfprune contributors. Apache-2.0.
"""Mean squared error as a local ``evaluate`` module: works offline (``evaluate.load(<this folder>)``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean of the squared differences between predictions and references, over every value."
_INPUTS = """
Args:
    predictions (list of float, or list of lists of float): predicted values (e.g. one forecast window per row).
    references (same shape as predictions): true values.
    squared (bool, default True): False returns the root mean squared error.
Returns:
    mse (float)
Examples:
    >>> metric = evaluate.load("hfprune/metrics/mse")
    >>> metric.compute(predictions=[[1.0, 2.0]], references=[[1.0, 4.0]])
    {'mse': 2.0}
"""

_SCALAR = datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")})
_ROWS = datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                           "references": datasets.Sequence(datasets.Value("float64"))})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Mse(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=[_SCALAR, _ROWS])

    def _compute(self, predictions, references, squared=True):
        diff = np.concatenate([np.ravel(np.asarray(p, dtype=np.float64) - np.asarray(r, dtype=np.float64))
                               for p, r in zip(predictions, references)])
        value = float(np.mean(diff ** 2))
        return {"mse": value if squared else float(np.sqrt(value))}

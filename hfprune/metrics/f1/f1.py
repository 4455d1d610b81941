# Copyright hfprune contributors. Apache-2.0.
"""F1 score as a local ``evaluate`` module: works offline (``evaluate.load(<this folder>)``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Harmonic mean of precision and recall: F1 = 2 * P * R / (P + R)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str, optional): "binary" (the class pos_label only), "macro" (unweighted mean over the classes
        present), "micro" (from global counts; equals accuracy for single-label data) or "weighted" (mean
        weighted by each class's number of references). Default: "binary" when at most two distinct labels occur
        in predictions and references, else "macro" (a binary F1 of class 1 says little about three classes).
    pos_label (int, default 1): the positive class for average="binary".
Returns:
    f1 (float): in [0, 1]; a class with no predicted and no true examples scores 0.
Examples:
    >>> metric = evaluate.load("hfprune/metrics/f1")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 1])  # three classes: macro
    {'f1': 0.7777777777777777}
"""

AVERAGES = ("binary", "macro", "micro", "weighted")


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average=None, pos_label=1):
        if average is not None and average not in AVERAGES:
            raise ValueError(f"average={average!r}; choose one of {AVERAGES}")
        pred, ref = np.asarray(predictions), np.asarray(references)
        classes = np.union1d(pred, ref).tolist()
        if average is None:
            average = "binary" if len(classes) <= 2 else "macro"
        counts = {c: (float(((pred == c) & (ref == c)).sum()), float(((pred == c) & (ref != c)).sum()),
                      float(((pred != c) & (ref == c)).sum())) for c in classes}
        if average == "binary":
            return {"f1": _f1(*counts.get(pos_label, (0.0, 0.0, 0.0)))}
        if average == "micro":
            return {"f1": _f1(*(sum(v[i] for v in counts.values()) for i in range(3)))}
        scores = {c: _f1(*v) for c, v in counts.items()}
        if average == "macro":
            return {"f1": float(np.mean(list(scores.values()))) if scores else 0.0}
        support = {c: float((ref == c).sum()) for c in scores}
        return {"f1": sum(scores[c] * support[c] for c in scores) / max(sum(support.values()), 1.0)}

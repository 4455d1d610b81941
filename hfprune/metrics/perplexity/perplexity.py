# Copyright hfprune contributors. Apache-2.0.
"""Perplexity from per-sequence losses, as a local ``evaluate`` module: works offline.

Unlike the Hub's ``perplexity`` measurement (which downloads a model by id and runs it on raw texts), this one
takes what evaluation already computed: each sequence's mean token negative log-likelihood and its token count,
so the pruned model in memory is what gets measured.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "exp of the mean negative log-likelihood per token, over all tokens of all sequences."
_INPUTS = """
Args:
    losses (list of float): per sequence, the mean token negative log-likelihood (natural log), e.g. model(...).loss.
    num_tokens (list of int): per sequence, the number of tokens that loss averages over.
Returns:
    perplexity (float), loss (float): the token-weighted mean loss and its exp.
Examples:
    >>> metric = evaluate.load("hfprune/metrics/perplexity")
    >>> round(metric.compute(losses=[1.0, 2.0], num_tokens=[1, 1])["perplexity"], 4)
    4.4817
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, losses, num_tokens):
        n = np.asarray(num_tokens, dtype=np.float64)
        if n.sum() <= 0:
            raise ValueError("num_tokens sums to 0: nothing to average")
        loss = float((np.asarray(losses, dtype=np.float64) * n).sum() / n.sum())
        return {"perplexity": math.exp(loss), "loss": loss}

# Copyright hfprune contributors. Apache-2.0.
"""Architecture adapters, one per model family, registered by exact ``config.model_type``.

An adapter is data: an :class:`~hfprune.core.structure.ArchSpec` built from the config (where q/k/v/o and the
FFN projections live, which attributes to sync) plus the config fields that can describe a uniform plan
without remote code. Family-specific refusals live in ``check``. Adding a family: one module here that calls
:func:`register`, imported below, and its case in the tests' registry (tests/cases_nlp.py or cases_ts.py).
"""

# Importing a family's module registers it.
from . import bert, distilbert, gpt2, llama, moe, patchtsmixer, patchtst, seq2seq_ts, timesfm, vit  # noqa: E402,F401,I001
from .base import Adapter, StackFields, get_adapter, register, supported_model_types

__all__ = ["Adapter", "StackFields", "get_adapter", "register", "supported_model_types"]

"""Every registered model_type has a test case, and unsupported models get an error listing the supported."""

import pytest
import transformers as T

import hfprune

from .cases import CASES
from .cases_moe import MOE_CASES


def test_every_adapter_has_a_case():
    assert set(hfprune.supported_model_types()) == set(CASES) | set(MOE_CASES)


def test_unsupported_model_type_lists_the_supported():
    model = T.T5Model(T.T5Config(d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8, vocab_size=50))
    with pytest.raises(ValueError) as err:
        hfprune.apply_plan(model, {"layers": [{}]})
    assert "model_type 't5'" in str(err.value)
    for model_type in ("bert", "llama", "patchtst", "timesfm"):
        assert model_type in str(err.value)

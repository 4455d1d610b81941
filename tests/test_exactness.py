"""Sliced models compute what the masked dense model computes, for every registered adapter."""

import copy

import pytest
import torch

import hfprune
from hfprune.core.masking import masked

from .cases import CASES as DENSE_CASES
from .cases import random_plan
from .cases_moe import MOE_CASES

CASES = {**DENSE_CASES, **MOE_CASES}  # mixture-of-experts families too (experts, neurons inside them)
PARAMS = [(t, attn) for t, case in sorted(CASES.items()) for attn in case.attn_implementations]


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _run(model, case, seed: int):
    torch.manual_seed(1234)  # models that sample inside forward (Informer) draw the same numbers
    return _flat(case.outputs(model(**case.inputs(seed))))


def assert_close(a: list, b: list, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("model_type,attn", PARAMS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_masked(model_type, attn, mode, seed):
    case = CASES[model_type]
    torch.manual_seed(seed)
    dense = case.build(attn)
    dense.train(mode == "train")
    plan = random_plan(dense, seed)
    with masked(dense, plan):
        expected = _run(dense, case, seed)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    sliced.train(mode == "train")
    assert_close(_run(sliced, case, seed), expected)
    # not vacuous: the plan changes what the model computes, and slicing really removed weights
    assert any(not torch.equal(x, y) for x, y in zip(_run(dense, case, seed), expected))
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("model_type", sorted(t for t, c in CASES.items() if c.generate))
def test_generation_with_kv_cache(model_type):
    case = CASES[model_type]
    torch.manual_seed(0)
    dense = case.build(case.attn_implementations[-1]).eval()  # sdpa where the family has it
    plan = random_plan(dense, 0)
    ids = case.inputs(0)["input_ids"][:1]
    with masked(dense, plan):
        expected = dense.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    sliced = hfprune.apply_plan(copy.deepcopy(dense), plan)
    got = sliced.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(got, expected)

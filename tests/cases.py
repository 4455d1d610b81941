"""Tiny models of every supported family, with inputs, for tests parametrized over the adapter registry.

A case builds a randomly initialised model from a small config and a batch for it. `CASES` must cover
every registered model_type (tests/test_registry.py checks), so a new adapter is tested by default.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Case:
    model_type: str
    build: Callable  # (attn_implementation: str | None) -> model
    inputs: Callable  # (seed) -> dict of forward kwargs
    attn_implementations: tuple = ("eager",)
    outputs: Callable = lambda out: out.logits  # picks the tensor(s) to compare
    generate: bool = False  # a decoder LM: also test generation with a KV cache
    extra: dict = field(default_factory=dict)


CASES: dict = {}


def register(case: Case) -> Case:
    CASES[case.model_type] = case
    return case


def random_plan(model, seed: int, gqa_uniform: bool = True) -> dict:
    """A heterogeneous plan: layer 0 loses all heads, layer 1 all FFN neurons, the last layer is dropped
    when the stack can drop one, other layers keep random subsets (GQA-valid)."""
    from hfprune.core.apply import model_dims
    from hfprune.core.arch import get_adapter

    rng = random.Random(seed)
    spec = get_adapter(model).arch_spec(model.config)
    plan = {}
    for key, layers in model_dims(model).items():
        stack = spec.stacks[key]
        entries = []
        for i, blocks in enumerate(layers):
            if stack.droppable and len(layers) > 2 and i == len(layers) - 1:
                entries.append({"drop": True})
                continue
            entry = {}
            for name, size in blocks.items():
                is_attn = name in stack.attention
                if name == "experts":  # routed experts: a random subset, at least the router's top-k
                    top_k = getattr(model.config, "num_experts_per_tok", 1)
                    entry[name] = sorted(rng.sample(range(size[0]), rng.randint(top_k, size[0] - 1)))
                elif name == "expert_ffn":  # as many neurons in every expert, a multiple of 8
                    experts, width = blocks["experts"][0], size[0] // blocks["experts"][0]
                    per = 8 if width >= 16 else width
                    entry[name] = sorted(e * width + j for e in range(experts) for j in rng.sample(range(width), per))
                elif is_attn and i == 0:
                    entry[name] = []
                elif not is_attn and i == 1:
                    entry[name] = []
                elif is_attn:
                    entry[name] = _random_heads(rng, *size)
                else:
                    n = size[0]
                    entry[name] = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
            entries.append(entry)
        plan[key] = entries
    return plan


def _random_heads(rng: random.Random, heads: int, kv_heads: int) -> list:
    group = heads // kv_heads
    groups = sorted(rng.sample(range(kv_heads), rng.randint(1, kv_heads)))
    per_group = rng.randint(1, group)
    keep = []
    for g in groups:
        keep += sorted(rng.sample(range(g * group, (g + 1) * group), per_group))
    if len(keep) == heads and heads > 1:  # make sure something goes
        keep = keep[1:] if group == 1 else keep
    return sorted(keep)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Families register their cases here.
from . import cases_nlp, cases_ts  # noqa: E402,F401

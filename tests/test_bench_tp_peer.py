"""Benchmark helpers: the CPU-time budget of ``benchmarks/common.py``'s TimeLimit, and the transformers-5 adaptation
of Torch-Pruning's LLM pruner in ``benchmarks/tp_llm_peer.py`` (config sync, GQA check), on a tiny random Llama."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import TimeLimit  # noqa: E402

tp = pytest.importorskip("torch_pruning")


def _stops(limit: TimeLimit, work) -> bool:
    control = SimpleNamespace(should_training_stop=False)
    limit.on_train_begin(None, None, control)
    work()
    limit.on_step_end(None, None, control)
    return control.should_training_stop


def test_time_limit_cpu_clock_ignores_waiting_and_counts_compute():
    assert _stops(TimeLimit(0.05, clock="wall"), lambda: time.sleep(0.15))
    assert not _stops(TimeLimit(0.05, clock="cpu"), lambda: time.sleep(0.15))  # a loaded machine: waiting

    def burn():
        end = time.process_time() + 0.1
        while time.process_time() < end:
            pass

    assert _stops(TimeLimit(0.05, clock="cpu"), burn)


def test_time_limit_rejects_unknown_clock():
    with pytest.raises(ValueError, match="'gpu'"):
        TimeLimit(1.0, clock="gpu")


def test_gqa_remapped():
    from tp_llm_peer import gqa_remapped

    config = SimpleNamespace(num_attention_heads=6, num_key_value_heads=3)  # groups {0,1} {2,3} {4,5}
    assert not gqa_remapped(config, set(), set())
    assert not gqa_remapped(config, {1, 2, 5}, set())  # one query head per group
    assert gqa_remapped(config, {0, 1, 2}, set())  # 3,4,5 -> KV 0,1,2 instead of 1,2,2
    assert not gqa_remapped(config, {2, 3}, {1})  # a whole group with its KV head


def test_tp_pruner_sync_config_gives_plain_llama(tmp_path):
    from tp_llm_peer import check_reload, sync_config, tp_pruner
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    pruner = tp_pruner(model, tp.importance.GroupMagnitudeImportance(p=2), 0.25, 0.25, 4)
    for group in pruner.step(interactive=True):
        group.prune()
    shape = sync_config(model)
    assert shape == {"heads": 6, "kv_heads": 2, "ffn": 72}  # hidden size kept, heads cut per KV group
    assert model.model.layers[0].self_attn.q_proj.in_features == 48
    probe = {"input_ids": torch.randint(0, 97, (2, 12))}
    check_reload(model, probe, tmp_path / "plain")  # raises unless the stock reload gives the same logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert reloaded.config.num_attention_heads == 6 and reloaded.config.intermediate_size == 72

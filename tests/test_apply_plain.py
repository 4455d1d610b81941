"""A uniform plan becomes a plain config only when the stock config class accepts the new widths."""

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfprune


def tiny_llama(hidden: int, heads: int, head_dim: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=hidden, num_attention_heads=heads,
                                        num_key_value_heads=heads, head_dim=head_dim, intermediate_size=32,
                                        num_hidden_layers=2)).eval()


def test_heads_that_do_not_divide_hidden_fall_back_to_remote_code(tmp_path):
    # LlamaConfig rejects hidden_size % num_attention_heads != 0 even with an explicit head_dim, so 3 of 4 heads
    # (64 % 3 != 0) must not be written as a plain checkpoint that stock transformers would refuse to load.
    model = hfprune.apply_plan(tiny_llama(64, 4, 16), {"layers": [{"heads": [0, 1, 3]}] * 2})
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" in config and "hfprune" in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(reloaded(ids).logits, expected)


def test_heads_that_divide_hidden_stay_plain(tmp_path):
    model = hfprune.apply_plan(tiny_llama(64, 4, 16), {"layers": [{"heads": [0, 3]}] * 2})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and config["num_attention_heads"] == 2 and config["head_dim"] == 16

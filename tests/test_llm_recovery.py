"""The decoder-LM path end to end on a tiny GQA Llama: uniform pruning gives a plain checkpoint that stock
transformers reloads (no remote code) and generates from; LoRA fine-tuning of the pruned model merges back into a
plain pruned checkpoint; perplexity is the token-weighted mean NLL."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T

import hfprune
from hfprune.perplexity import nll_sum, perplexity

peft = pytest.importorskip("peft")

VOCAB = 48
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _llama(seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return T.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def _blocks(n: int, length: int = 16, seed: int = 0) -> list:
    """Learnable text: each row counts upwards from a random start (mod the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, VOCAB, (n, 1), generator=g)
    ids = 3 + (starts - 3 + torch.arange(length)) % (VOCAB - 3)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def _batch(rows: list) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _assert_plain(directory) -> None:
    assert not list(directory.glob("*.py")), "a plain checkpoint carries no modeling code"
    config = json.loads((directory / "config.json").read_text())
    assert "auto_map" not in config and "hfprune" not in config


def _generate(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def pruned():
    """A tiny Llama pruned uniformly to ~70% of its parameters from activation scores (at least one key/value
    group kept: a layer without attention cannot be stated by the stock config)."""
    model = _llama()
    calibration = [_batch(_blocks(4, seed=s)) for s in range(2)]
    config = hfprune.PruningConfig(criterion="activation", params_ratio=0.7, scope="uniform", recovery="none",
                                    min_heads=1)
    result = hfprune.prune(model, calibration, config)
    return result


def test_uniform_pruning_gives_a_plain_checkpoint_that_generates(pruned, tmp_path):
    model, plan = pruned.model, pruned.plan
    assert pruned.after.params <= 0.7 * pruned.before.params
    widths = {tuple(full if layer.get(name) is None else len(layer.get(name)) for name, full in (("heads", 6),
                                                                                              ("ffn", 64)))
              for layer in plan.layers}
    assert len(widths) == 1, f"uniform scope keeps one structure in every layer, got {widths}"
    heads, ffn = widths.pop()
    assert heads in (3, 6)  # whole key/value groups (3 query heads each)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, heads // 3)
    assert model.config.intermediate_size == ffn and model.config.head_dim == 8
    assert (heads, ffn) != (6, 64), "something must have been pruned"

    model.save_pretrained(tmp_path)
    _assert_plain(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock class, no trust_remote_code
    assert type(reloaded) is T.LlamaForCausalLM
    batch = _batch(_blocks(2, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    ids = batch["input_ids"][:1, :5]
    out = _generate(reloaded, ids)
    assert out.shape == (1, 11) and torch.equal(out, _generate(model, ids))


def test_lora_recovery_merges_into_a_plain_pruned_checkpoint(pruned, tmp_path):
    import copy

    import datasets

    base = copy.deepcopy(pruned.model)
    shapes = {n: p.shape for n, p in base.state_dict().items()}
    train = datasets.Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in _blocks(64, seed=3)])
    test = [_batch(_blocks(8, seed=4))]
    ppl_before = perplexity(base, test)["perplexity"]

    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    args = T.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, learning_rate=1e-2,
                               per_device_train_batch_size=8, save_strategy="no", report_to=[], use_cpu=True,
                               logging_steps=10, seed=0, dataloader_num_workers=0)
    T.Trainer(model=lora, args=args, train_dataset=train).train()
    ppl_lora = perplexity(lora, test)["perplexity"]
    assert ppl_lora < 0.9 * ppl_before, f"LoRA did not learn: {ppl_before:.2f} -> {ppl_lora:.2f}"

    merged = lora.merge_and_unload().eval()
    assert isinstance(merged, T.LlamaForCausalLM)  # peft wrappers gone
    assert {n: p.shape for n, p in merged.state_dict().items()} == shapes  # still the pruned widths
    assert math.isclose(perplexity(merged, test)["perplexity"], ppl_lora, rel_tol=1e-4)

    merged.save_pretrained(tmp_path / "merged")
    _assert_plain(tmp_path / "merged")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.intermediate_size == pruned.model.config.intermediate_size
    for name, tensor in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = test[0]["input_ids"][:1, :5]
    assert torch.equal(_generate(reloaded, ids), _generate(merged, ids))


# -- perplexity ---------------------------------------------------------------------------------------------


def test_perplexity_is_token_weighted_and_matches_the_model_loss():
    model = _llama(seed=1)
    rows = _blocks(6, seed=5)
    batch = _batch(rows)
    with torch.no_grad():
        loss = model(**batch).loss  # transformers' mean over all predicted tokens
    whole = perplexity(model, [batch])
    assert whole["tokens"] == 6 * 15
    assert math.isclose(whole["nll"], float(loss), rel_tol=1e-5)
    split = perplexity(model, [_batch(rows[:1]), _batch(rows[1:])])  # uneven batches: same figure
    assert math.isclose(split["perplexity"], whole["perplexity"], rel_tol=1e-5)


def test_perplexity_leaves_out_padding():
    model = _llama(seed=1)
    row = _blocks(1, seed=6)[0]
    padded = {"input_ids": torch.cat([row["input_ids"], torch.zeros(4, dtype=torch.long)])[None],
              "attention_mask": torch.cat([row["attention_mask"], torch.zeros(4, dtype=torch.long)])[None]}
    short = perplexity(model, [{"input_ids": row["input_ids"][None]}])
    long = perplexity(model, [padded])
    assert long["tokens"] == short["tokens"] == 15
    assert math.isclose(long["nll"], short["nll"], rel_tol=1e-5)  # right padding never changes earlier tokens


def test_nll_sum_checks_shapes_and_empty_data():
    logits = torch.zeros(2, 4, 5)
    labels = torch.full((2, 4), -100)
    assert nll_sum(logits, labels)[1] == 0
    labels[0, 2] = 3
    total, n = nll_sum(logits, labels)
    assert n == 1 and math.isclose(float(total), math.log(5), rel_tol=1e-6)  # uniform logits: log V
    with pytest.raises(ValueError, match="disagree"):
        nll_sum(logits, labels[:, :3])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(_llama(), [])

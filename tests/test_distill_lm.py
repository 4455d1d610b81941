"""Distillation of causal LMs: the shifted token items, the top-k KL (teacher top-k plus a remainder bucket) against
hand computations, DistillationTrainer on tiny Llama / GPT-2 (normalisation under gradient accumulation, hidden
states of a student with fewer layers, LoRA then merge into a checkpoint that reloads), and precomputed teacher
logits on disk giving the same training as the live teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T
from transformers import TrainingArguments

import hfprune
from hfprune.distill import (
    DistillationConfig,
    DistillationTrainer,
    TeacherLogitsStore,
    causal_token_mask,
    kl_distill_loss,
    precompute_teacher_logits,
    teacher_topk,
    topk_kl_distill_loss,
)
from hfprune.distill.logits_store import INDEX_FILE, TeacherLogitsCollator, TeacherLogitsDataset, pad_right
from hfprune.distill.losses import topk_kl_per_item

VOCAB = 40
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def llama(seed: int = 0, layers: int = 3, ffn: int = 48) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return T.LlamaForCausalLM._from_config(config, attn_implementation="eager")


def gpt2(seed: int = 0) -> T.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return T.GPT2LMHeadModel._from_config(config, attn_implementation="eager")


MODELS = {"llama": llama, "gpt2": gpt2}


def rows(n: int, length: int = 10, seed: int = 0, pad: bool = True, prompt: int = 0) -> list:
    """Counting sequences (learnable), right-padded to ``length`` with random real lengths; labels -100 on padding
    and on the first ``prompt`` tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(3, VOCAB, (1,), generator=g))
        ids = 3 + (start - 3 + torch.arange(length)) % (VOCAB - 3)
        real = int(torch.randint(4, length + 1, (1,), generator=g)) if pad else length
        mask = (torch.arange(length) < real).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:prompt] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def stack(batch_rows: list) -> dict:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in batch_rows]) for k in batch_rows[0]}


def trainer_for(tmp_path, model, teacher=None, cfg=None, extra=None, **kw):
    base = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                max_steps=2, learning_rate=1e-2, seed=0, logging_steps=1, train_sampling_strategy="sequential")
    return DistillationTrainer(model=model, args=TrainingArguments(str(tmp_path / "run"), **{**base, **kw}),
                               teacher=teacher, distill_config=cfg or DistillationConfig(), **(extra or {}))


# -- pure functions -------------------------------------------------------------------------------------------


def test_causal_token_mask_shifts_and_masks_padding_and_prompt():
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])  # right and left padding
    labels = torch.tensor([[-100, -100, 5, 6], [4, 5, -100, -100], [-100, -100, 7, 8]])
    got = causal_token_mask(attention, labels, attention.shape)
    assert got.tolist() == [[False, True, True], [True, False, False], [False, False, True]]
    assert causal_token_mask(None, None, (2, 5)).shape == (2, 4) and causal_token_mask(None, None, (2, 5)).all()


def hand_topk_kl(s, t, k, temp):
    """KL over the teacher's top-k tokens plus one bucket for the rest, in plain Python floats."""
    def softmax(x):
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]
    ps, pt = softmax(s), softmax(t)
    top = sorted(range(len(t)), key=lambda i: -t[i])[:k]
    kl = sum(pt[i] * math.log(pt[i] / ps[i]) for i in top)
    rest_t, rest_s = 1 - sum(pt[i] for i in top), 1 - sum(ps[i] for i in top)
    if k < len(t) and rest_t > 0:
        kl += rest_t * math.log(rest_t / rest_s)
    return temp * temp * kl


def test_topk_kl_matches_hand_computation_and_full_kl_at_k_equals_vocab():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = [(0, 0), (0, 1), (1, 0)]
    for k in (1, 3, 6):
        want = sum(hand_topk_kl(s[b, j].tolist(), t[b, j].tolist(), k, 2.0) for b, j in kept) / 3
        got = topk_kl_distill_loss(s, *teacher_topk(t, k, 2.0), 2.0, mask)
        assert float(got) == pytest.approx(want, rel=1e-5)
        # a lower bound of the full KL (coarsening never increases a KL)
        assert float(got) <= float(kl_distill_loss(s, t, 2.0, mask)) + 1e-6
    full = topk_kl_distill_loss(s, *teacher_topk(t, 7, 2.0), 2.0, mask, num_items=5)
    assert float(full) == pytest.approx(float(kl_distill_loss(s, t, 2.0, mask, num_items=5)), rel=1e-5)
    assert float(topk_kl_distill_loss(t, *teacher_topk(t, 3, 1.0), 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_gradients_are_finite_and_fp16_values_stay_close():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 50, generator=g) * 8).requires_grad_()
    t = torch.randn(4, 50, generator=g) * 8  # peaked: the remainder bucket is tiny
    for k in (5, 50):
        values, indices, lse = teacher_topk(t, k, 1.0)
        loss = topk_kl_distill_loss(s, values, indices, lse, 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None
        half = topk_kl_distill_loss(s, values.half(), indices.int(), lse, 1.0)
        assert float(half) == pytest.approx(float(loss), rel=2e-2, abs=1e-2)
    with pytest.raises(ValueError, match="line up"):
        topk_kl_per_item(s, values[:, :3], indices, lse, 1.0)
    with pytest.raises(ValueError, match="top_k=51"):
        teacher_topk(t, 51, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k=0"),
    ({"top_k": -3}, "top_k=-3"),
    ({"top_k": True}, "top_k=True"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"top_k": "8"}, "top_k='8'"),
    ({"top_k": 8, "loss": "mse"}, "needs loss='kl'"),
    ({"causal": "yes"}, "causal='yes'"),
])
def test_bad_lm_configs_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


# -- the trainer on causal LMs --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("top_k", [None, 5])
def test_trainer_loss_is_the_shifted_masked_kl_plus_the_lm_loss(tmp_path, family, top_k):
    student, teacher = MODELS[family](0), MODELS[family](1)
    cfg = DistillationConfig(temperature=2.0, alpha=0.7, top_k=top_k)
    trainer = trainer_for(tmp_path, student, teacher, cfg)
    assert trainer._loss_shifts_labels  # detected from the class
    inputs = stack(rows(3, prompt=2))
    student.eval()
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        lm = student(**inputs).loss
    items = [(b, j) for b in range(3) for j in range(9)
             if inputs["attention_mask"][b, j] and inputs["attention_mask"][b, j + 1]
             and inputs["labels"][b, j + 1] != -100]
    k = top_k or VOCAB
    kl = sum(hand_topk_kl(s[b, j].tolist(), t[b, j].tolist(), k, 2.0) for b, j in items) / len(items)
    assert float(loss) == pytest.approx(0.7 * kl + 0.3 * float(lm), rel=1e-5)


def test_top_k_larger_than_the_vocabulary_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=f"top_k=99 is more than the model's vocabulary of {VOCAB}"):
        trainer_for(tmp_path, llama(0), llama(1), DistillationConfig(top_k=99))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("top_k", [None, 4])
def test_gradient_accumulation_sums_to_the_full_batch_loss(tmp_path, top_k):
    student = llama(0)
    trainer = trainer_for(tmp_path, student, llama(1), DistillationConfig(alpha=0.6, hidden_weight=0.5, top_k=top_k))
    data = rows(6, seed=3, prompt=1)
    micro = [stack(data[:2]), stack(data[2:])]  # different padding: a mean of means would be wrong
    student.train()
    trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    accumulated = sum(trainer.compute_loss(student, b) for b in micro)
    trainer.get_batch_samples(iter([stack(data)]), 1, torch.device("cpu"))
    full = trainer.compute_loss(student, stack(data))
    assert float(accumulated) == pytest.approx(float(full), rel=1e-5)


def test_training_with_accumulation_matches_one_big_batch(tmp_path):
    def run(sub, batch, ga):
        model = llama(0)
        trainer = trainer_for(tmp_path / sub, model, llama(1), DistillationConfig(alpha=0.5, top_k=6),
                              per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=3,
                              extra={"train_dataset": rows(24, seed=4, prompt=1)})
        trainer.train()
        return model.state_dict()

    a, b = run("a", 8, 1), run("b", 4, 2)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_hidden_state_loss_with_a_pruned_student_with_fewer_layers(tmp_path):
    teacher = llama(0, layers=4)
    student = llama(0, layers=4)
    hfprune.apply_plan(student, {"layers": [{}, {"drop": True}, {}, {"drop": True}]})
    assert student.config.num_hidden_layers == 2
    cfg = DistillationConfig(alpha=0.5, hidden_weight=1.0, top_k=8)
    trainer = trainer_for(tmp_path, student, teacher, cfg, max_steps=3, extra={"train_dataset": rows(16)})
    assert trainer.layer_map == {1: 2, 2: 4} and len(trainer.projections) == 0  # same width: no projection
    inputs = stack(rows(3, seed=5))
    student.eval()
    only_hidden = DistillationConfig(alpha=0.0, hidden_weight=1.0)
    trainer.distill_config = only_hidden
    inputs_no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    got = trainer.compute_loss(student, inputs_no_labels)
    with torch.no_grad():
        s_h = student(**inputs_no_labels, output_hidden_states=True).hidden_states
        t_h = teacher(**inputs_no_labels, output_hidden_states=True).hidden_states
    keep = causal_token_mask(inputs["attention_mask"], None, inputs["input_ids"].shape)
    per = sum(((s_h[i][:, :-1] - t_h[j][:, :-1]) ** 2).mean(-1) for i, j in ((1, 2), (2, 4))) / 2
    assert float(got) == pytest.approx(float(per[keep].mean()), rel=1e-5)
    trainer.distill_config = cfg
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


# -- LoRA, then merge into a checkpoint -----------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["uniform", "per_layer"])
def test_lora_distillation_then_merge_reloads_to_the_same_logits(tmp_path, scope):
    peft = pytest.importorskip("peft")
    teacher = llama(0)
    student = llama(0)
    if scope == "uniform":
        plan = {"layers": [{"heads": [0, 1], "ffn": list(range(0, 48, 2))}] * 3}  # one KV group, half the FFN
    else:
        plan = {"layers": [{"ffn": list(range(16))}, {"heads": [2, 3]}, {"ffn": list(range(40))}]}
    hfprune.apply_plan(student, plan)
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainer = trainer_for(tmp_path, lora, teacher, DistillationConfig(alpha=0.8, top_k=8), max_steps=8,
                          learning_rate=3e-2, extra={"train_dataset": rows(16)})
    assert trainer._loss_shifts_labels  # detected through the peft wrapper
    probe_train = stack(rows(16)[:8])
    lora.eval()
    with torch.no_grad():
        first = float(trainer.compute_loss(lora, probe_train))
    trainer.train()
    lora.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(lora, probe_train)) < first
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    merged = lora.merge_and_unload().eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n in merged.state_dict())
    merged.save_pretrained(tmp_path / "merged")  # hfprune's save: plain when the stock config states it
    probe = stack(rows(3, seed=9))
    with torch.no_grad():
        want = merged(**probe).logits
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    if scope == "uniform":
        assert "auto_map" not in config and not list((tmp_path / "merged").glob("*.py"))
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    else:
        assert "auto_map" in config
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
        with torch.no_grad():
            again = hfprune.from_pretrained(tmp_path / "merged").eval()(**probe).logits
        torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**probe).logits, want, rtol=1e-5, atol=1e-5)


# -- precomputed teacher logits -------------------------------------------------------------------------------


def test_precomputed_store_round_trip_shards_and_replacement(tmp_path):
    teacher = llama(1)
    data = rows(7, seed=2)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    out = precompute_teacher_logits(teacher, data, tmp_path / "store", top_k=5, temperature=2.0, batch_size=2,
                                    dtype="bfloat16", shard_tokens=10)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(index["shards"]) > 2 and index["rows"] == 7 and index["dtype"] == "bfloat16"
    assert index["tokens"] == sum(int(r["attention_mask"].sum()) for r in data)
    store = TeacherLogitsStore(out)
    with torch.no_grad():
        logits = teacher(**{k: v for k, v in stack(data).items() if k != "labels"}).logits
    values, indices, lse = teacher_topk(logits, 5, 2.0)
    for i, r in enumerate(data):
        rec, real = store.row(i), r["attention_mask"].bool()
        assert rec["values"].dtype == torch.bfloat16 and rec["indices"].dtype == torch.int32
        assert torch.equal(rec["input_ids"], r["input_ids"][real].int())
        torch.testing.assert_close(rec["values"].float(), values[i][real], rtol=1e-2, atol=1e-2)
        assert torch.equal(rec["indices"].long(), indices[i][real])
        torch.testing.assert_close(rec["lse"], lse[i][real], rtol=1e-5, atol=1e-5)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))
    # written again with fewer shards: the old extra shards go, the user's file stays
    precompute_teacher_logits(teacher, data, out, top_k=5, temperature=2.0, batch_size=8)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.txt", "teacher-logits-00000.safetensors", INDEX_FILE]
    with pytest.raises(ValueError, match="top_k=41"):
        precompute_teacher_logits(teacher, data, tmp_path / "other", top_k=41)
    assert not (tmp_path / "other").exists()


def test_collator_aligns_left_padding_and_checks_the_tokens(tmp_path):
    teacher = llama(1)
    data = [{"input_ids": r["input_ids"][r["attention_mask"].bool()]} for r in rows(4, seed=3)]
    store = TeacherLogitsStore(precompute_teacher_logits(teacher, data, tmp_path / "s", top_k=4, dtype="float32"))

    def pad_left(features):
        right = pad_right(features)
        length = right["attention_mask"].sum(1)
        return {k: torch.stack([torch.roll(v[b], int(v.shape[1] - length[b])) for b in range(len(v))])
                for k, v in right.items()}

    collate = TeacherLogitsCollator(pad_left, store)
    dataset = TeacherLogitsDataset(data, store)
    batch = collate([dataset[i] for i in range(4)])
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    for b in range(4):
        real = batch["attention_mask"][b].bool()
        assert torch.equal(batch["teacher_topk_values"][b][real], store.row(b)["values"])
        assert (batch["teacher_topk_values"][b][~real] == 0).all()
    bad = [dict(dataset[0]), dict(dataset[1])]
    bad[1]["input_ids"] = bad[1]["input_ids"].flip(0)
    with pytest.raises(ValueError, match="row 1: its tokens differ"):
        collate(bad)
    with pytest.raises(ValueError, match="has 3 rows"):
        TeacherLogitsDataset(data[:3], store)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_training_from_precomputed_logits_equals_training_with_the_live_teacher(tmp_path, dtype, tol):
    data = rows(16, seed=6, prompt=1)
    teacher = llama(1)
    store = precompute_teacher_logits(teacher, data, tmp_path / "logits", top_k=6, temperature=2.0, dtype=dtype,
                                      batch_size=4)
    cfg = DistillationConfig(alpha=0.7, temperature=2.0, top_k=6)

    def run(sub, teacher=None, **kw):
        model = llama(0)
        trainer = trainer_for(tmp_path / sub, model, teacher, cfg=cfg, max_steps=3, gradient_accumulation_steps=2,
                              per_device_train_batch_size=2, train_sampling_strategy="random",
                              extra={"train_dataset": data, **kw})
        batch = next(iter(trainer.get_train_dataloader()))
        model.eval()
        with torch.no_grad():
            first = float(trainer.compute_loss(model, batch))
        trainer.train()
        return trainer, first, model.state_dict()

    live, loss_live, weights_live = run("live", teacher=teacher)
    disk, loss_disk, weights_disk = run("disk", teacher_logits=store)
    assert disk.teacher is None and live.teacher is teacher
    assert loss_disk == pytest.approx(loss_live, rel=tol)
    assert weights_disk.keys() == weights_live.keys()
    for name in weights_live:
        torch.testing.assert_close(weights_disk[name], weights_live[name], rtol=tol, atol=tol)
    assert any(not torch.equal(weights_live[k], v) for k, v in llama(0).state_dict().items())


def test_precomputed_logits_with_a_datasets_dataset_and_extra_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([{**{k: v.tolist() for k, v in r.items()}, "text": "x"} for r in rows(8)])
    store = precompute_teacher_logits(llama(1), data, tmp_path / "logits", top_k=4)
    model = llama(0)
    trainer = DistillationTrainer(model=model, args=TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", max_steps=2, learning_rate=1e-2, seed=0), train_dataset=data, eval_dataset=data,
        teacher_logits=store, distill_config=DistillationConfig(alpha=0.9, top_k=4))
    trainer.train()
    metrics = trainer.evaluate()  # no teacher in memory, no logits for the eval rows: the LM loss alone
    assert math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("kwargs, match", [
    ({"distill_config": DistillationConfig(top_k=5)}, "hold the top-4 tokens: set DistillationConfig\\(top_k=4\\)"),
    ({"distill_config": DistillationConfig(top_k=4, temperature=1.0)}, "temperature 2.0"),
    ({"distill_config": DistillationConfig(top_k=4, hidden_weight=1.0)}, "hidden_weight > 0 needs a live"),
    ({"teacher": "live"}, "not both"),
])
def test_precomputed_logits_refuse_mismatches_before_training(tmp_path, kwargs, match):
    store = precompute_teacher_logits(llama(1), rows(4), tmp_path / "logits", top_k=4)
    kwargs = dict(kwargs)
    if kwargs.get("teacher") == "live":
        kwargs.update(teacher=llama(1), distill_config=DistillationConfig(top_k=4))
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=llama(0), args=TrainingArguments(str(tmp_path / "run"), report_to=[],
                                                                   use_cpu=True),
                            train_dataset=rows(4), teacher_logits=store, **kwargs)
    with pytest.raises(FileNotFoundError, match="no precomputed teacher logits"):
        DistillationTrainer(model=llama(0), args=TrainingArguments(str(tmp_path / "run"), report_to=[],
                                                                   use_cpu=True),
                            teacher_logits=tmp_path, distill_config=DistillationConfig(top_k=4))
    with pytest.raises(ValueError, match="is for causal LMs; BertForSequenceClassification"):
        DistillationTrainer(model=T.BertForSequenceClassification(T.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)),
            args=TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True), teacher_logits=store,
            distill_config=DistillationConfig(top_k=4))
    with pytest.raises(ValueError, match="has 5 rows"):
        DistillationTrainer(model=llama(0), args=TrainingArguments(str(tmp_path / "run"), report_to=[],
                                                                   use_cpu=True),
                            train_dataset=rows(5), teacher_logits=store, distill_config=DistillationConfig(top_k=4))


# -- two processes (torchrun, gloo) -----------------------------------------------------------------------------


def test_two_processes_match_one_process_with_live_and_precomputed_teacher(tmp_path):
    """The step's token count is global: 2 gloo processes x 4 rows, accumulated twice, train like 1 process x 8,
    from the live teacher and from precomputed logits alike (rows of different padding and masked prompts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .scripts.mp_distill_lm import lm_data, tiny_llama
    from .test_multiprocess import close, torchrun

    script = Path(__file__).parent / "scripts" / "mp_distill_lm.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    store = precompute_teacher_logits(tiny_llama(1), lm_data(), tmp_path / "logits", top_k=6, temperature=2.0,
                                      dtype="float32")

    def run(launcher, out, batch, *extra):
        cmd = launcher + [str(script), "--out", str(tmp_path / out), "--per-device-batch", str(batch), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(p.read_text()) for p in sorted((tmp_path / out).glob("rank*.json"))]

    one = run([sys.executable], "one", 8)[0]
    two = run(torchrun(), "two", 4)
    disk = run(torchrun(), "disk", 4, "--logits", str(store))
    assert [r["world"] for r in two + disk] == [2, 2, 2, 2]
    for result in two + disk:
        assert close(result["sums"], one["sums"], 1e-4)
        assert result["losses"] == pytest.approx(one["losses"], rel=1e-4)

"""Distil a tiny Llama (top-k KL, live teacher or precomputed logits) and write the result as JSON, per rank.

Usage (what tests/test_distill_lm.py runs; gloo on CPU):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/scripts/mp_distill_lm.py --out /tmp/two --per-device-batch 4
    OMP_NUM_THREADS=1 python tests/scripts/mp_distill_lm.py --out /tmp/one --per-device-batch 8
    ... --logits DIR   # train from precomputed teacher logits (written by the test with lm_data())

Both see the same global batches (sequential sampling, 2 accumulation steps), so their weights must agree.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 40


def tiny_llama(seed: int):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           pad_token_id=0, tie_word_embeddings=True)
    return T.LlamaForCausalLM._from_config(config, attn_implementation="eager")


def lm_data(n: int = 64, length: int = 12, seed: int = 0) -> list:
    """Counting sequences, right-padded at random lengths, the first token's label masked (a 'prompt')."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(3, VOCAB, (1,), generator=g))
        real = int(torch.randint(4, length + 1, (1,), generator=g))
        mask = (torch.arange(length) < real).long()
        ids = torch.where(mask.bool(), 3 + (start - 3 + torch.arange(length)) % (VOCAB - 3), 0)
        labels = torch.where(mask.bool(), ids, -100)
        labels[0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--logits", default=None, help="precomputed teacher logits (top-k 6, temperature 2)")
    a = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import TrainingArguments

    from hfprune.distill import DistillationConfig, DistillationTrainer

    model = tiny_llama(0)
    args = TrainingArguments(
        os.path.join(a.out, "run"), max_steps=4, per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
        ddp_find_unused_parameters=False)
    teacher = None if a.logits else tiny_llama(1)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=lm_data(), teacher=teacher,
                                  teacher_logits=a.logits,
                                  distill_config=DistillationConfig(alpha=0.7, temperature=2.0, top_k=6))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")),
              "sums": {k: [float(v.sum()), float(v.abs().sum())] for k, v in sorted(model.state_dict().items())},
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

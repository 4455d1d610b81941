"""Train a tiny BERT with PruningCallback (optionally distilling) and write the result as JSON, per rank.

Usage (what tests/test_multiprocess.py runs; gloo on CPU):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29555 tests/scripts/mp_train.py \
        --out /tmp/run2 --per-device-batch 4 --ga 2
    OMP_NUM_THREADS=1 python tests/scripts/mp_train.py --out /tmp/run1 --per-device-batch 8 --ga 2

Both see the same global batches (sequential sampling), so their plans and weights must agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_bert(seed: int = 0, num_labels: int = 2, hidden: int = 32, layers: int = 2, token: bool = False):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=num_labels)
    cls = BertForTokenClassification if token else BertForSequenceClassification
    return cls(config)


def toy_data(n: int = 64, seq: int = 12, seed: int = 0, token: bool = False) -> list:
    """Random token ids with right padding of random length; label = parity of the first token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 99, (seq,), generator=g)
        length = int(torch.randint(4, seq + 1, (1,), generator=g))
        mask = torch.zeros(seq, dtype=torch.long)
        mask[:length] = 1
        if token:
            labels = torch.where(mask.bool(), ids % 2, torch.full_like(ids, -100))
        else:
            labels = int(ids[0] % 2)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def summary(model) -> dict:
    h = hashlib.sha256()
    sums = {}
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
        sums[name] = [float(t.sum()), float(t.abs().sum())]
    return {"sha256": h.hexdigest(), "sums": sums}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=["distill", "prune"], default="distill")
    parser.add_argument("--calibration", action="store_true",
                        help="score from calibration batches (each rank gets its shard of 32 examples) instead of "
                             "from training gradients")
    a = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import Trainer, TrainingArguments

    from hfprune import PruningConfig
    from hfprune.distill import DistillationConfig, DistillationTrainer
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig

    model = tiny_bert(0)
    calibration = None
    if a.calibration:  # rank r of w scores on examples r, r + w, ...: together, all 32 once
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        shard = toy_data(32, seed=5)[rank::world]
        calibration = [{k: torch.stack([torch.as_tensor(e[k]) for e in shard[i:i + 4]]) for k in shard[0]}
                       for i in range(0, len(shard), 4)]
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.5),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=2),
                               calibration=calibration)
    args = TrainingArguments(
        os.path.join(a.out, "run"), max_steps=a.steps, per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=a.ga, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
        # the stock Trainer multiplies BERT's plain-mean loss by the world size otherwise (see DESIGN.md)
        average_tokens_across_devices=a.mode == "distill",
        ddp_find_unused_parameters=False,
    )
    kwargs = dict(model=model, args=args, train_dataset=toy_data(64), callbacks=[callback])
    if a.mode == "distill":
        teacher = tiny_bert(1, hidden=48)  # a different width: exercises the learned projection
        trainer = DistillationTrainer(teacher=teacher, distill_config=DistillationConfig(
            alpha=0.5, temperature=2.0, hidden_weight=0.5), **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "plan": callback.plan.to_dict(),
        "model": summary(model),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if a.mode == "distill":
        result["projection"] = summary(trainer.projections)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

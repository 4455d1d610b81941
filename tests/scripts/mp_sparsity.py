"""Train a tiny Llama with one PruningCallback pruning heads, neurons and single weights (gradual magnitude
sparsity) under gradient accumulation; write, per rank, what the masks and weights were after every step as JSON.

Usage (what tests/test_sparsity_ddp.py runs; gloo on CPU):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29556 tests/scripts/mp_sparsity.py \
        --out /tmp/sparse2 --per-device-batch 4 --ga 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_llama(seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return T.LlamaForCausalLM(config)


def rows(n: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (n, 12), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--ga", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    a = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hfprune import PruningConfig, SparsityConfig
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig

    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.6),
                               ScheduleConfig(kind="gradual", start_step=0, end_step=4, every=2),
                               sparsity=SparsityConfig(criterion="magnitude", sparsity=0.6))
    record = {"nonzero_masked": [], "structure_nonzero": [], "masks": [], "weights": [], "sparsity": []}

    class Record(TrainerCallback):  # after the pruning callback: what the optimizer step left
        def on_optimizer_step(self, args, state, control, **kwargs):
            engine = callback.sparse
            record["nonzero_masked"].append(sum(int(torch.count_nonzero(t.weight()[~engine.masks[t.name]]))
                                                for t in engine.targets))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            engine = callback.sparse
            record["structure_nonzero"].append(sum(int(torch.count_nonzero(p.detach().index_select(d, i)))
                                                   for p, d, i in callback._zero_targets))
            record["masks"].append(digest(engine.masks[t.name] for t in engine.targets))
            record["weights"].append(digest(p for _, p in sorted(model.named_parameters())))
            record["sparsity"].append(engine.sparsity)

    args = TrainingArguments(
        os.path.join(a.out, "run"), max_steps=a.steps, per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=a.ga, learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
        average_tokens_across_devices=False, ddp_find_unused_parameters=False)
    model = tiny_llama(0)
    trainer = Trainer(model=model, args=args, train_dataset=rows(), callbacks=[callback, Record()])
    trainer.train()
    engine = callback.sparse
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "plan": callback.plan.to_dict(),
        "events": [callback.events_done, engine.events_done],
        "final_masks": digest(engine.masks[t.name] for t in engine.targets),
        "final_weights": digest(p for _, p in sorted(model.state_dict().items())),
        "final_zeros": {t.name: float((t.weight() == 0).float().mean()) for t in engine.targets},
        **record,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

"""Prune (and optionally distil) a tiny BERT with PruningCallback under FSDP2, save with trainer.save_model(), and
write per-rank JSON: what tests/test_fsdp2.py compares with one process on the same global batch.

Usage (gloo on CPU; what tests/test_fsdp2.py runs):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29561 tests/scripts/fsdp2_train.py \
        --out /tmp/fsdp2 --fsdp --per-device-batch 4 --ga 2
    OMP_NUM_THREADS=1 python tests/scripts/fsdp2_train.py --out /tmp/one --per-device-batch 8 --ga 2

With CUDA (one GPU per process; accelerate takes the FSDP2 path itself, nothing is forced):

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_train.py --out /tmp/fsdp2 --fsdp --per-device-batch 4 --ga 2

On CPU, accelerate 1.x silently trains with DDP when asked for FSDP (AcceleratorState enables FSDP only for GPU-like
distributed types, never MULTI_CPU): ``--fsdp`` then switches the Trainer's accelerator to its FSDP2 path by hand
(:func:`force_fsdp2`, test-only), so accelerate's own ``fully_shard`` wrapping, gradient reduction and
``get_state_dict`` run on gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.scripts.mp_train import summary, tiny_bert, toy_data  # noqa: E402


def force_fsdp2(trainer) -> None:
    """Put a Trainer built with ``fsdp=True, fsdp_config={"version": 2}`` on accelerate's FSDP2 path on CPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return  # a GPU run: accelerate did it
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True
    trainer.place_model_on_device = False


def tiny_llama(seed: int = 0):
    """Grouped-query attention (4 heads, 2 key/value groups) and tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def lm_data(n: int = 64) -> list:
    return [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"],
             "labels": torch.where(e["attention_mask"].bool(), e["input_ids"], -100)} for e in toy_data(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true", help="train under FSDP2 (fsdp_config version 2)")
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--criterion", default="fisher")
    parser.add_argument("--mode", choices=["prune", "distill"], default="prune")
    parser.add_argument("--model", choices=["bert", "llama"], default="bert")
    parser.add_argument("--prepruned", action="store_true", help="start from a model pruned to different widths per "
                        "layer (a second pruning phase)")
    parser.add_argument("--uneven", action="store_true", help="rank 1 gets one calibration batch fewer")
    parser.add_argument("--calibration", action="store_true", help="score 32 calibration examples, sharded by rank")
    a = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hfprune import PruningConfig
    from hfprune.distill import DistillationConfig, DistillationTrainer
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    calibration = None
    if a.calibration:  # rank r of w scores examples r, r + w, ...: together, all 32 once
        shard = toy_data(32, seed=5)[rank::world]
        if a.uneven and rank == 1:
            shard = shard[:-4]  # one batch fewer than rank 0
        calibration = [{k: torch.stack([torch.as_tensor(e[k]) for e in shard[i:i + 4]]) for k in shard[0]}
                       for i in range(0, len(shard), 4)]
    model = tiny_bert(0) if a.model == "bert" else tiny_llama(0)
    if a.prepruned:
        from hfprune import apply_plan

        apply_plan(model, {"layers": [{"heads": [0, 1, 3], "ffn": list(range(40))}, {"ffn": list(range(8, 48))}]})
    callback = PruningCallback(PruningConfig(criterion=a.criterion, macs_ratio=0.5),
                               ScheduleConfig(kind="gradual", start_step=0 if a.calibration or a.criterion in (
                                   "magnitude", "random") else 2, end_step=4, every=2), calibration=calibration)
    seen = {}

    class Spy(TrainerCallback):  # what the parameters were while training ran
        def on_step_end(self, args, state, control, model=None, **kwargs):
            p = model.base_model.get_submodule("encoder.layer.0.attention.self.query" if a.model == "bert" else
                                               "layers.0.self_attn.q_proj").weight
            seen["type"] = type(p).__name__
            seen["local_rows"] = int(p.to_local().shape[0]) if hasattr(p, "to_local") else int(p.shape[0])

    extra = {}
    if a.fsdp:
        layer = {"bert": "BertLayer", "llama": "LlamaDecoderLayer"}[a.model]
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [layer]}}
    args = TrainingArguments(
        os.path.join(a.out, "run"), max_steps=a.steps, per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=a.ga, learning_rate=1e-3, report_to=[], use_cpu=not cuda, logging_steps=1,
        save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", seed=0,
        average_tokens_across_devices=a.mode == "distill", ddp_find_unused_parameters=False, **extra)
    data = toy_data(64) if a.model == "bert" else lm_data(64)
    kwargs = dict(model=model, args=args, train_dataset=data, callbacks=[callback, Spy()])
    if a.mode == "distill":
        teacher = tiny_bert(1, hidden=48) if a.model == "bert" else tiny_llama(1)  # bert: a learned projection
        trainer = DistillationTrainer(teacher=teacher, distill_config=DistillationConfig(
            alpha=0.5, temperature=2.0, hidden_weight=0.5), **kwargs)
    else:
        trainer = Trainer(**kwargs)
    if a.fsdp:
        force_fsdp2(trainer)
    trainer.train()
    saved = os.path.join(a.out, "saved")
    trainer.save_model(saved)  # FSDP2: rank 0 writes the sliced copy the callback gathered
    result = {
        "rank": rank, "world": world, "fsdp": bool(trainer.is_fsdp_enabled), "param": seen,
        "plan": callback.plan.to_dict(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "pruned": summary(callback.pruned_model) if callback.pruned_model is not None else None,
    }
    if a.mode == "distill":
        result["projection"] = summary(trainer.projections)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

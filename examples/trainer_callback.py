# Copyright hfprune contributors. Apache-2.0.
"""Prune while training: the stock ``Trainer`` with ``PruningCallback`` (gradual Fisher pruning to half the MACs).

A tiny BERT learns a toy task (label = parity of the first token) for a few dozen steps on the CPU. Usage::

    python examples/trainer_callback.py                # 40 steps, pruned from step 0 to 20, then saved and reloaded
    python examples/trainer_callback.py --steps 200 --output-dir pruned-bert
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, Trainer, TrainingArguments

from hfprune import PruningCallback, PruningConfig, ScheduleConfig
from hfprune.core.cost import estimate

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
args = parser.parse_args()

torch.manual_seed(0)
config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=2)
model = AutoModelForSequenceClassification.from_config(config)
ids = torch.randint(3, 100, (512, 12))
train = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": int(x[0] % 2)} for x in ids]

callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.5),  # Fisher from the training gradients
                           schedule=ScheduleConfig(kind="gradual", start_step=0, end_step=args.steps // 2, every=5))
with tempfile.TemporaryDirectory() as tmp:
    out_dir = args.output_dir or tmp
    targs = TrainingArguments(out_dir, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3,
                              logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                              average_tokens_across_devices=False)  # see "Known limits" in the README
    dense = estimate(model)
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[callback])
    trainer.train()  # masks during training, slices the model in place when training ends
    print(f"{estimate(model).table()}\nMACs {dense.macs:,} -> {estimate(model).macs:,}")
    trainer.save_model(out_dir)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=ids[:4]).logits, model.eval()(input_ids=ids[:4]).logits)
print(f"reloaded from {out_dir}: outputs {'identical' if same else 'DIFFERENT'}")
raise SystemExit(0 if same else 1)

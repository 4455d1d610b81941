"""Gradual pruning with distillation vs one-shot pruning + fine-tuning, on the MiniLM movie-review classifier.

    flock /tmp/hfprune-bench.lock python benchmarks/gradual_minilm.py --minutes 6 --steps 300

Both arms start from the dense fine-tuned teacher (hfprune.data.teachers.movie_review_teacher()) and end at 33% of
the encoder's MACs (seq 128):
- gradual: PruningCallback (fisher from training gradients, cubic schedule over the first 2/3 of the steps) while
  DistillationTrainer distils from the dense teacher (KL, T=2, alpha=0.9 + hidden-state MSE); stops at --steps or
  --minutes, whichever comes first;
- one-shot: hfprune.prune (fisher on calibration batches) to the budget at once, then plain fine-tuning, or the
  same distillation as the gradual arm, for the same wall-clock time the gradual arm used (pruning and a 12-step
  timing probe included). The step count is sized from the probe so that the learning-rate schedule runs to its
  end inside that time (a time limit stops it if it runs over).
Reports test accuracy vs the teacher, training time, and measured latency (batch 32 x 128, interleaved, median).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from common import TimeLimit  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hfprune  # noqa: E402
from hfprune import PruningConfig  # noqa: E402
from hfprune.core.cost import estimate  # noqa: E402
from hfprune.data.teachers import MOVIE_TEACHER, movie_review_teacher, tokenize_movie_reviews  # noqa: E402
from hfprune.distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hfprune.pruning.callback import PruningCallback  # noqa: E402
from hfprune.pruning.latency import cpu_name, time_models  # noqa: E402
from hfprune.pruning.schedule import ScheduleConfig  # noqa: E402

MACS_RATIO = 0.33
RESULTS = Path(__file__).parent / "results"
EARLIER_HEADER = "## Earlier runs of this benchmark"


def accuracy(model, data, collator) -> float:
    model.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(data, batch_size=128, collate_fn=collator)
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


class StepClock(TrainerCallback):
    """Wall-clock seconds of the optimizer steps after the first ``skip`` (warm-up) ones."""

    def __init__(self, skip: int = 2):
        self.skip, self.times, self.last = skip, [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None and state.global_step > self.skip:
            self.times.append(now - self.last)
        self.last = now


def step_time(make_trainer, steps: int = 12) -> float:
    """Median seconds per optimizer step of ``make_trainer(steps, callbacks)`` (a throwaway copy of the arm, run
    for a few steps with the arm's own Trainer, so data loading, logging and the teacher are all counted)."""
    clock = StepClock()
    make_trainer(steps, [clock]).train()
    return statistics.median(clock.times)


def latency(models: dict, rounds: int = 7) -> dict:
    """Median seconds per forward at batch 32 x 128 (hfprune.pruning.latency.time_models: interleaved)."""
    x = {"input_ids": torch.randint(1000, 2000, (32, 128)), "attention_mask": torch.ones(32, 128, dtype=torch.long)}
    return {k: statistics.median(v) / 1000 for k, v in time_models(models, x, rounds, warmup=1).items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock per arm")
    p.add_argument("--steps", type=int, default=400, help="max optimizer steps per arm (the time limit may stop first)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, dropout); the split is fixed")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the cached movie-review teacher)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    out = RESULTS / ("gradual_minilm.md" if a.seed == 0 else f"gradual_minilm_seed{a.seed}.md")
    teacher_dir = Path(a.teacher) if a.teacher else movie_review_teacher()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    data = tokenize_movie_reviews(tok, MOVIE_TEACHER["seed"], MOVIE_TEACHER["max_length"])
    collator = DataCollatorWithPadding(tok)
    load = lambda: AutoModelForSequenceClassification.from_pretrained(teacher_dir)  # noqa: E731
    teacher = load()
    dense = estimate(teacher, seq_len=128)
    rows = {"teacher": {"acc": accuracy(teacher, data["test"], collator), "train_s": 0.0, "model": teacher}}

    def targs(name, steps):
        return TrainingArguments(f"/tmp/hfprune-gradual/{name}", max_steps=steps, learning_rate=5e-5,
                                 per_device_train_batch_size=32, warmup_steps=0.05, weight_decay=0.01, seed=a.seed,
                                 save_strategy="no", report_to=[], logging_steps=25, use_cpu=True,
                                 disable_tqdm=True)

    # gradual + distillation
    student = load()
    end = int(a.steps * 2 / 3)
    cb = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=MACS_RATIO),
                         ScheduleConfig(kind="gradual", start_step=0, end_step=end, every=max(1, end // 12)))
    trainer = DistillationTrainer(model=student, args=targs("gradual", a.steps), train_dataset=data["train"],
                                  data_collator=collator, teacher=teacher, callbacks=[cb, TimeLimit(a.minutes * 60)],
                                  distill_config=DistillationConfig(temperature=2.0, alpha=0.9, hidden_weight=1.0))
    t = time.perf_counter()
    trainer.train()
    rows["gradual + distill"] = {"acc": accuracy(student, data["test"], collator),
                                 "train_s": time.perf_counter() - t, "model": student,
                                 "steps": trainer.state.global_step, "schedule_done": cb.events_done[-1:] == [end]}

    # one-shot, then plain fine-tuning or distillation, for the same wall-clock time as the gradual arm
    budget_s = rows["gradual + distill"]["train_s"]
    cal = [collator([data["train"][i] for i in range(j, j + 32)]) for j in range(0, 256, 32)]
    for name, distil in (("one-shot + fine-tune", False), ("one-shot + distill", True)):
        model = load()
        t = time.perf_counter()
        hfprune.prune(model, [{k: v for k, v in b.items()} for b in cal],
                      PruningConfig(criterion="fisher", macs_ratio=MACS_RATIO))

        def make(steps, callbacks, m=model, distil=distil, name=name):
            common = dict(model=m, args=targs(name.replace(" ", ""), steps), train_dataset=data["train"],
                          data_collator=collator, callbacks=callbacks)
            if distil:
                return DistillationTrainer(teacher=teacher, distill_config=DistillationConfig(
                    temperature=2.0, alpha=0.9, hidden_weight=1.0), **common)
            return Trainer(**common)

        step_s = step_time(lambda steps, cbs, m=model: make(steps, cbs, m=copy.deepcopy(m)))
        left_s = budget_s - (time.perf_counter() - t)
        trainer = make(max(1, int(left_s / step_s)), [TimeLimit(left_s)])
        trainer.train()
        rows[name] = {"acc": accuracy(model, data["test"], collator), "train_s": time.perf_counter() - t,
                      "model": model, "steps": trainer.state.global_step}
    lat = latency({k: r["model"] for k, r in rows.items()})
    lines = [
        "| model | test acc | vs teacher (points) | MACs / dense (seq 128) | params | train time | steps | "
        "latency b32 x 128 (median of 7) | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, r in rows.items():
        c = estimate(r["model"], seq_len=128)
        lines.append(f"| {k} | {100 * r['acc']:.2f}% | {100 * (r['acc'] - rows['teacher']['acc']):+.2f} | "
                     f"{c.macs / dense.macs:.3f} | {c.params:,} | {r['train_s'] / 60:.1f} min | {r.get('steps', '-')} "
                     f"| {1000 * lat[k]:.0f} ms | {lat['teacher'] / lat[k]:.2f}x |")
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch threads "
               f"{torch.get_num_threads()}, torch {torch.__version__}, transformers {transformers.__version__}, "
               f"hfprune {hfprune.__version__}")
    text = "\n".join([
        "# Gradual pruning + distillation vs one-shot + fine-tuning (MiniLM, movie reviews)", "",
        f"Command: `flock /tmp/hfprune-bench.lock python benchmarks/gradual_minilm.py --minutes {a.minutes} "
        f"--steps {a.steps}" + (f" --seed {a.seed}" if a.seed else "") + "`", f"Machine: {machine}", "", *lines, "",
        f"Gradual schedule reached its last pruning step: {rows['gradual + distill']['schedule_done']}.", ""])
    print(text)
    # a hand-written record of earlier runs, if the file has one, is kept below the new table
    existing = out.read_text() if out.is_file() else ""
    earlier = existing[existing.index(EARLIER_HEADER):] if EARLIER_HEADER in existing else ""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + ("\n" + earlier if earlier else ""))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()

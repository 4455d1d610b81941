# Copyright hfprune contributors. Apache-2.0.
"""Weight sparsity on the MiniLM movie-review classifier: test accuracy against sparsity for three ways to get
there with the same fine-tuning budget, and one row that combines structured and unstructured pruning.

    python benchmarks/sparsity_minilm.py --steps 6 --sparsities 80 --out /tmp/smoke.md         # smoke run, ~10 min
    python benchmarks/sparsity_minilm.py --steps 60 --sparsities 80,50,70,90 --long-steps 180   # the docs' table

Every row starts from the same dense fine-tuned model (``hfprune.data.teachers.movie_review_teacher()``, also the
teacher and the reference row) and trains ``--steps`` optimizer steps of batch ``--batch`` (same learning rate
and schedule) on the movie-review train split; sparsity is over every attention and FFN projection of the 6 layers
(embeddings, pooler and classifier dense):
- ``gradual``: gradual magnitude pruning (``SparsityCallback``, Zhu & Gupta's cubic schedule over the first 2/3 of
  the steps, 10 mask updates) while ``DistillationTrainer`` distils from the dense teacher (KL T=2, alpha 0.9,
  hidden-state MSE);
- ``movement``: the same schedule with movement scores (``-dL/dW * W`` accumulated at every step), plain Trainer;
- ``oneshot``: ``hfprune.sparsify`` (magnitude) at once, then plain fine-tuning with the zeros kept
  (``SparsityCallback(None)``).
``--distill`` chooses which arms distil (default: gradual only, as the issue phrases it).
Combined row (``--combined``): ``hfprune.prune`` (fisher, one-shot) to 60% of the encoder's MACs, then 50%
unstructured magnitude, then the same fine-tuning with the zeros kept; saved with ``hfprune.save_sparse`` plain
(zeros in place) and compact, both reloaded and compared with the in-memory logits.

Writes ``--out`` (markdown) and the same name with ``.json``; the JSON is rewritten after every row, and a second
run with the same ``--out`` and settings skips the rows it already holds (resume after a stop).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from gradual_minilm import accuracy  # noqa: E402
from sparsity_common import machine  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import hfprune  # noqa: E402
from hfprune import DistillationConfig, DistillationTrainer, PruningConfig, ScheduleConfig, SparsityCallback  # noqa: E402
from hfprune.core.cost import estimate  # noqa: E402
from hfprune.data.teachers import MOVIE_TEACHER, movie_review_teacher, tokenize_movie_reviews  # noqa: E402
from hfprune.pruning.sparsity import SparsityConfig  # noqa: E402
from hfprune.pruning.sparsity.checkpoint import current_plan  # noqa: E402

ARMS = ("gradual", "movement", "oneshot")
SEQ = 128  # MACs are counted at this sequence length, as in the other MiniLM benchmarks
CALIBRATION = 512


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of every row's fine-tuning")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--sparsities", default="50,70,80,90", help="percent, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--distill", default="gradual", help="arms that distil from the teacher (comma-separated)")
    p.add_argument("--no-combined", dest="combined", action="store_false", help="skip the structured + sparse row")
    p.add_argument("--long-steps", type=int, default=0,
                   help="also one gradual (+ distillation if the gradual arm distils) 80%% row with this many steps")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, dropout); the split is fixed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparsity_minilm.md"))
    a = p.parse_args(argv)
    try:
        sparsities = [int(s) for s in a.sparsities.split(",") if s]
    except ValueError:
        sys.exit(f"--sparsities {a.sparsities!r}: give whole percents, comma-separated, e.g. 50,70,80,90")
    arms = [s for s in a.arms.split(",") if s]
    distilled = {s for s in a.distill.split(",") if s}
    bad = [s for s in sparsities if not 0 < s < 100] + [s for s in arms + sorted(distilled) if s not in ARMS]
    if bad or a.steps < 3 or a.batch < 1:
        sys.exit(f"bad values {bad or (a.steps, a.batch)}: sparsities are percent in (0, 100), arms and --distill "
                 f"are from {ARMS}, --steps >= 3, --batch >= 1")
    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    out = Path(a.out)
    settings = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed, "distill": sorted(distilled)}
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    keep = saved.get("settings") == settings
    run = {"settings": settings, "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(), "load_start": saved["load_start"] if keep else os.getloadavg(),
           "rows": saved["rows"] if keep else []}

    teacher_dir = movie_review_teacher()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    data = tokenize_movie_reviews(tok, MOVIE_TEACHER["seed"], MOVIE_TEACHER["max_length"])
    collator = DataCollatorWithPadding(tok)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    # every row starts from a copy of this one: DistillationTrainer freezes the teacher it is given, in place
    start = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    dense = estimate(teacher, seq_len=SEQ)
    test_acc = lambda m: 100 * accuracy(m, data["test"], collator)  # noqa: E731
    run["test_size"] = len(data["test"])

    def done(name, sparsity, steps):
        return any(r["name"] == name and r["sparsity_target"] == sparsity and r["steps"] == steps
                   for r in run["rows"])

    def record(row):
        run["rows"].append(row)
        out.with_suffix(".json").write_text(json.dumps(run, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    if not done("teacher", 0, 0):
        record({"name": "teacher", "sparsity_target": 0, "steps": 0, "acc": test_acc(teacher), "sparsity": 0.0,
                "macs_ratio": 1.0, **params(teacher)})

    def fine_tune(model, name, steps, callback, distil):
        args = TrainingArguments(f"/tmp/hfprune-sparsity-minilm/{name}", max_steps=steps, learning_rate=a.lr,
                                 per_device_train_batch_size=a.batch, warmup_steps=0.05, weight_decay=0.01,
                                 seed=a.seed, save_strategy="no", report_to=[], logging_steps=25, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        common = dict(model=model, args=args, train_dataset=data["train"], data_collator=collator,
                      callbacks=[callback])
        if distil:
            trainer = DistillationTrainer(teacher=teacher, distill_config=DistillationConfig(
                temperature=2.0, alpha=0.9, hidden_weight=1.0), **common)
        else:
            trainer = Trainer(**common)
        trainer.train()
        return trainer.state.global_step

    def arm(kind, sparsity, steps):
        name = f"{kind} {sparsity}%"
        model, distil = copy.deepcopy(start).train(), kind in distilled
        wall, cpu, before = time.perf_counter(), time.process_time(), None
        config = SparsityConfig(criterion="movement" if kind == "movement" else "magnitude", sparsity=sparsity / 100)
        if kind == "oneshot":
            hfprune.sparsify(model, None, config)
            probe_wall, probe_cpu = time.perf_counter(), time.process_time()
            before = test_acc(model)
            # the accuracy probe is not part of the training budget: move the start clocks past it
            wall, cpu = wall + time.perf_counter() - probe_wall, cpu + time.process_time() - probe_cpu
            model.train()
            callback = SparsityCallback(None)
        else:
            end = int(steps * 2 / 3)
            callback = SparsityCallback(config, ScheduleConfig(kind="gradual", start_step=0, end_step=end,
                                                               every=max(1, end // 10)))
        ran = fine_tune(model, f"{kind}{sparsity}", steps, callback, distil)
        row = {"name": kind, "sparsity_target": sparsity, "steps": ran, "distil": distil,
               "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "sparsity": current_plan(model).sparsity, "acc": test_acc(model.eval()), "acc_before_tune": before,
               "schedule_done": kind == "oneshot" or callback.events_done[-1:] == [int(steps * 2 / 3)],
               "macs_ratio": estimate(model, seq_len=SEQ).macs / dense.macs, **params(model)}
        record(row)
        print(name, f"{row['acc']:.2f}%", flush=True)

    for sparsity in sparsities:
        for kind in arms:
            if not done(kind, sparsity, a.steps):
                arm(kind, sparsity, a.steps)
    if a.combined and not done("combined", 50, a.steps):
        record(combined(start, tok, data, collator, test_acc, fine_tune, a.steps, dense))
    if a.long_steps and not done("gradual", 80, a.long_steps):
        arm("gradual", 80, a.long_steps)
    run["load_end"] = os.getloadavg()
    out.with_suffix(".json").write_text(json.dumps(run, indent=1) + "\n")
    text = render(run)
    out.write_text(text)
    print(text)


def params(model) -> dict:
    """Total parameters, and nonzero ones (what a sparse format stores)."""
    ps = list(model.parameters())
    return {"params": sum(p.numel() for p in ps), "nonzero": sum(int(torch.count_nonzero(p)) for p in ps)}


def combined(start, tok, data, collator, test_acc, fine_tune, steps, dense) -> dict:
    """Fisher structured pruning to 60% of the MACs, 50% unstructured magnitude, fine-tune with the zeros kept; saved
    plain and compact and reloaded."""
    model = copy.deepcopy(start).eval()
    wall, cpu = time.perf_counter(), time.process_time()
    calibration = data["train"].shuffle(seed=0).select(range(CALIBRATION))
    hfprune.prune(model, calibration, PruningConfig(criterion="fisher", macs_ratio=0.6, seq_len=SEQ), tokenizer=tok)
    structured_acc = test_acc(model)
    hfprune.sparsify(model, None, SparsityConfig(criterion="magnitude", sparsity=0.5))
    sparse_acc = test_acc(model)
    ran = fine_tune(model.train(), "combined", steps, SparsityCallback(None), False)
    row = {"name": "combined", "sparsity_target": 50, "steps": ran, "distil": False,
           "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "sparsity": current_plan(model).sparsity, "acc": test_acc(model.eval()), "acc_structured": structured_acc,
           "acc_before_tune": sparse_acc, "macs_ratio": estimate(model, seq_len=SEQ).macs / dense.macs,
           **params(model)}
    batch = {k: v for k, v in collator([data["test"][i] for i in range(64)]).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "compact"):
            directory = Path(tmp) / kind
            hfprune.save_sparse(model, directory, compact=kind == "compact")
            row[f"disk_{kind}"] = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
            loaders = {"hfprune.from_pretrained": lambda d=directory: hfprune.from_pretrained(d)}
            if kind == "plain":  # the remote-code path people without hfprune use
                loaders["AutoModel... trust_remote_code"] = lambda d=directory: (
                    AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True))
            for how, load in loaders.items():
                with torch.no_grad():
                    back = load().eval()(**batch).logits
                row[f"reload_{kind} ({how})"] = float((back - logits).abs().max())
    teacher_files = movie_review_teacher().glob("*.safetensors")
    row["disk_teacher"] = sum(f.stat().st_size for f in teacher_files)
    return row


def render(run: dict) -> str:
    s = run["settings"]
    rows = run["rows"]
    teacher = next(r for r in rows if r["name"] == "teacher")
    label = {"gradual": "gradual magnitude", "movement": "movement (gradual)", "oneshot": "one-shot magnitude"}
    lines = ["| sparsity | method | distil | test acc | vs teacher (points) | after one-shot, before tuning | steps | "
             "train wall | train CPU | nonzero params | schedule done |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| 0% | teacher (dense, fine-tuned) | | {teacher['acc']:.2f}% | | | | | | {teacher['nonzero']:,} | |"]
    for r in sorted((r for r in rows if r["name"] in label), key=lambda r: (r["sparsity_target"], r["steps"],
                                                                             list(label).index(r["name"]))):
        before = f"{r['acc_before_tune']:.2f}%" if r.get("acc_before_tune") is not None else ""
        lines.append(f"| {100 * r['sparsity']:.1f}% | {label[r['name']]} | {'yes' if r['distil'] else 'no'} | "
                     f"{r['acc']:.2f}% | {r['acc'] - teacher['acc']:+.2f} | {before} | {r['steps']} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min | {r['nonzero']:,} | "
                     f"{'yes' if r['schedule_done'] else 'NO'} |")
    text = ["# Weight sparsity on MiniLM (movie reviews)", "",
            f"Command: `{('python benchmarks/sparsity_minilm.py ' + run['argv']).strip()}`",
            f"Machine: {run['machine']}; load average at start {fmt_load(run['load_start'])}"
            + (f", at end {fmt_load(run['load_end'])}" if run.get("load_end") else "")
            + " (wall and CPU times are on this shared, loaded machine)",
            f"Fine-tuning of every row: {s['steps']} steps of batch {s['batch']}, lr {s['lr']}, seed {s['seed']}; "
            f"accuracy on the test split of the seeded movie-review split ({run['test_size']:,} sentences). "
            "Sparsity is over the 36 attention and FFN projections (embeddings, pooler and classifier dense).",
            "", *lines, ""]
    c = next((r for r in rows if r["name"] == "combined"), None)
    if c:
        mib, disk = 2**20, c["disk_teacher"]
        text += ["Combined: fisher structured pruning to 60% of the MACs (one-shot), then 50% unstructured magnitude, "
                 f"then {c['steps']} steps of fine-tuning with the zeros kept.", "",
                 "| stage | test acc | vs teacher | MACs / dense (seq 128) | params | nonzero params |",
                 "|---|---:|---:|---:|---:|---:|",
                 f"| teacher | {teacher['acc']:.2f}% | | 1.000 | {teacher['params']:,} | {teacher['nonzero']:,} |",
                 f"| structured 60% MACs | {c['acc_structured']:.2f}% | {c['acc_structured'] - teacher['acc']:+.2f} "
                 f"| {c['macs_ratio']:.3f} | {c['params']:,} | |",
                 f"| + 50% unstructured | {c['acc_before_tune']:.2f}% | {c['acc_before_tune'] - teacher['acc']:+.2f} "
                 f"| {c['macs_ratio']:.3f} | {c['params']:,} | |",
                 f"| + fine-tune ({c['steps']} steps, {c['wall_s'] / 60:.1f} min wall incl. pruning) | {c['acc']:.2f}% "
                 f"| {c['acc'] - teacher['acc']:+.2f} | {c['macs_ratio']:.3f} | {c['params']:,} | {c['nonzero']:,} |",
                 "",
                 "| checkpoint | MiB (safetensors) | vs teacher |", "|---|---:|---:|",
                 f"| teacher | {c['disk_teacher'] / mib:.1f} | 1.00 |",
                 f"| combined, zeros in place | {c['disk_plain'] / mib:.1f} | {c['disk_plain'] / disk:.2f} |",
                 f"| combined, compact | {c['disk_compact'] / mib:.1f} | {c['disk_compact'] / disk:.2f} |",
                 "", "Reload (max abs logit difference against the in-memory model, 64 test sentences): "
                 + "; ".join(f"{k[7:]}: {v:.1e}" for k, v in c.items() if k.startswith("reload_")), ""]
    r80 = [r for r in rows if r["sparsity_target"] == 80 and r["name"] in label]
    if r80:
        best = max(r80, key=lambda r: r["acc"])
        gap = best["acc"] - teacher["acc"]
        text += [f"Target (80% sparsity within 1 point of the teacher): best 80% row {label[best['name']]}, "
                 f"{best['steps']} steps: {gap:+.2f} points, {'met' if gap >= -1 else 'NOT met'}.", ""]
    return "\n".join(text)


def fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    main()

# Copyright hfprune contributors. Apache-2.0.
"""Retraining-free one-shot pruning of the fine-tuned MiniLM movie-review classifier, against Torch-Pruning.

For 60% and 50% of the encoder's MACs (seq len 128) and each criterion: test accuracy against the dense model,
pruning wall time (512 calibration examples from the train split), measured CPU latency speedup at batch 32 x
seq 128 (dense and pruned timed alternately, median of several rounds) against the ideal ``1 / MACs ratio``, and
whether ``save_pretrained`` + ``AutoModelForSequenceClassification.from_pretrained`` reloads the result.

    pip install torch-pruning==1.6.1   # the peer
    flock /tmp/hfprune-bench.lock python benchmarks/oneshot_minilm.py            # about 10-15 minutes on 2 cores
    flock /tmp/hfprune-bench.lock python benchmarks/oneshot_minilm.py --quick    # a smoke run

Writes the table to ``benchmarks/results/oneshot_minilm.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import hfprune  # noqa: E402
from hfprune.core.calibration import calibration_batches  # noqa: E402
from hfprune.core.cost import estimate  # noqa: E402
from hfprune.data.teachers import MOVIE_TEACHER, movie_review_teacher, tokenize_movie_reviews  # noqa: E402
from hfprune.pruning.latency import cpu_name, time_models  # noqa: E402

BUDGETS = (0.6, 0.5)
ROWS = (  # (criterion, recovery)
    ("magnitude", "none"), ("taylor", "none"), ("fisher", "none"), ("fisher", "rearrange"), ("fisher", "lstsq"),
    ("fisher", "full"), ("activation", "none"), ("random", "none"),
)
PEER_ROWS = ("taylor", "magnitude")
CALIBRATION = 512
SEED = 0


def wait_for_teacher(timeout_s: float = 3600) -> Path:
    """The cached teacher; while another process is still building it (its directory has no teacher.json yet),
    poll rather than start a second build."""
    from hfprune.data.assets import cache_dir

    key = "minilm-movie-" + "-".join(f"{k}{v}" for k, v in sorted(MOVIE_TEACHER.items()))
    done = cache_dir() / "teachers" / key / "teacher.json"
    start = time.time()
    while not done.is_file() and time.time() - start < timeout_s and _teacher_building():
        print("waiting for the teacher (being built; see /tmp/logs/teacher.log) ...", file=sys.stderr, flush=True)
        time.sleep(30)
    return movie_review_teacher()


def _teacher_building() -> bool:
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and b"benchmarks/teacher.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def accuracy(model, batches) -> float:
    correct = total = 0
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def latency(dense, pruned, rounds: int, batch: int = 32, seq: int = 128) -> tuple:
    """Median seconds of dense and pruned at ``batch`` x ``seq`` (hfprune.pruning.latency.time_models: interleaved)."""
    ids = torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = time_models({"dense": dense, "pruned": pruned}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                        rounds, warmup=1)
    return statistics.median(times["dense"]) / 1000, statistics.median(times["pruned"]) / 1000


def reloads(model, batch) -> str:
    """``yes`` if save_pretrained + from_pretrained(trust_remote_code=True) gives the same logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
            back = AutoModelForSequenceClassification.from_pretrained(tmp, trust_remote_code=True).eval()
        except Exception as e:  # noqa: BLE001  (the peer's failure is a result to report)
            why = "size mismatch" if "mismatch" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:50]}"
            return f"no ({why})"
        with torch.inference_mode():
            same = torch.allclose(model(**inputs).logits, back(**inputs).logits, atol=1e-4)
    return "yes" if same else "no (different outputs)"


def torch_pruning_peer(teacher: Path, calibration: list, macs_ratio: float, importance: str):
    """Torch-Pruning 1.6.1's HF BERT path: heads and FFN channels cut by the same ratio in every layer; the
    embeddings, pooler and classifier are ignored (otherwise the hidden size and the logits get pruned)."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    start = time.perf_counter()
    example = {k: v[:2] for k, v in calibration[0].items() if k != "labels"}
    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for lin in (m.query, m.key, m.value):
                num_heads[lin] = m.num_attention_heads
    ratio = 1.0 - macs_ratio
    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=ratio, global_pruning=False,
        ignored_layers=[model.bert.embeddings, model.bert.pooler, model.classifier],
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        output_transform=lambda out: out.logits.sum(), forward_fn=lambda m, x: m(**x),
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in calibration:
            model(**batch).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # the example's follow-up: sync the attention's head bookkeeping
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features
    return model, time.perf_counter() - start


def machine() -> str:
    cpu = cpu_name()
    try:
        import torch_pruning as tp

        peer = f"torch-pruning {_dist_version('torch-pruning')} (module reports {tp.__version__})"
    except ImportError:
        peer = "torch-pruning not installed"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, hfprune {hfprune.__version__}, {peer}, "
            f"Python {platform.python_version()}")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, rounds and test examples (smoke run)")
    parser.add_argument("--rounds", type=int, default=7, help="latency rounds per row")
    parser.add_argument("--teacher", default=None, help="a fine-tuned model directory instead of the cached teacher")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "oneshot_minilm.md"))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    teacher = Path(args.teacher) if args.teacher else wait_for_teacher()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    data = tokenize_movie_reviews(tokenizer, seed=MOVIE_TEACHER["seed"], max_length=MOVIE_TEACHER["max_length"])
    calibration = data["train"].shuffle(seed=SEED).select(range(CALIBRATION))
    test = data["test"].select(range(256)) if args.quick else data["test"]
    collate = DataCollatorWithPadding(tokenizer)
    test_batches = calibration_batches(test, 128, collate_fn=collate)
    calib_batches = calibration_batches(calibration, 32, collate_fn=collate)
    rounds = 3 if args.quick else args.rounds
    rows = ROWS[:1] + ROWS[5:6] if args.quick else ROWS
    budgets = BUDGETS[1:] if args.quick else BUDGETS

    dense = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    dense_macs = estimate(dense, seq_len=128).macs
    dense_acc = accuracy(dense, test_batches)
    print(f"dense test accuracy {dense_acc:.2f} on {len(test)} sentences", flush=True)
    results = []
    for budget in budgets:
        for criterion, recovery in rows:
            model = copy.deepcopy(dense)
            config = hfprune.PruningConfig(criterion=criterion, macs_ratio=budget, seq_len=128, recovery=recovery,
                                           seed=SEED)
            start = time.perf_counter()
            result = hfprune.prune(model, calibration, config, tokenizer=tokenizer)
            seconds = time.perf_counter() - start
            name = criterion if recovery == "none" else f"{criterion} + {recovery}"
            results.append(_row("hfprune", name, budget, model, dense, dense_macs, dense_acc, seconds,
                                test_batches, rounds, result.after.macs))
            print(_fmt(results[-1]), flush=True)
        for importance in PEER_ROWS[: 1 if args.quick else None]:
            try:
                model, seconds = torch_pruning_peer(teacher, calib_batches, budget, importance)
                macs = estimate(model, seq_len=128).macs
                results.append(_row("Torch-Pruning 1.6.1", importance, budget, model, dense, dense_macs, dense_acc,
                                    seconds, test_batches, rounds, macs))
            except ImportError:
                print("torch-pruning is not installed: peer rows left out", file=sys.stderr)
                break
            print(_fmt(results[-1]), flush=True)
    table = _table(results, dense_acc, len(test))
    command = "flock /tmp/hfprune-bench.lock python " + " ".join(["benchmarks/oneshot_minilm.py"] + sys.argv[1:])
    text = (f"# One-shot pruning of the MiniLM movie-review classifier\n\n{table}\n\n"
            f"- Machine: {machine()}\n- Command: `{command}`\n- Teacher: `{teacher}` (all-MiniLM-L6-v2 fine-tuned on "
            f"the seeded movie-review train split); {CALIBRATION} calibration examples from the train split "
            f"(seed {SEED}); test accuracy on the {len(test)}-sentence test split.\n")
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, out)
    print(f"wrote {out}")


def _row(tool, name, budget, model, dense, dense_macs, dense_acc, seconds, test_batches, rounds, macs) -> dict:
    acc = accuracy(model, test_batches)
    t_dense, t_pruned = latency(dense, model, rounds)
    ratio = macs / dense_macs
    speedup = t_dense / t_pruned
    return {"tool": tool, "criterion": name, "budget": budget, "macs": ratio, "acc": acc, "delta": acc - dense_acc,
            "seconds": seconds, "dense_ms": 1000 * t_dense, "pruned_ms": 1000 * t_pruned, "speedup": speedup,
            "of_ideal": speedup * ratio, "reload": reloads(model, test_batches[0])}


HEADER = ("| MACs budget | tool | criterion | MACs kept | test acc | Δ vs dense | prune s | dense / pruned ms "
          "| speedup | of ideal | reloads |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")


def _fmt(r: dict) -> str:
    return (f"| {r['budget']:.0%} | {r['tool']} | {r['criterion']} | {r['macs']:.3f} | {r['acc']:.2f} | "
            f"{r['delta']:+.2f} | {r['seconds']:.1f} | {r['dense_ms']:.0f} / {r['pruned_ms']:.0f} | "
            f"{r['speedup']:.2f}x | {r['of_ideal']:.0%} | {r['reload']} |")


def _table(results: list, dense_acc: float, n_test: int) -> str:
    lines = [f"Dense teacher: {dense_acc:.2f}% test accuracy ({n_test} sentences). Speedup: dense / pruned median "
             "latency at batch 32 x seq 128 on the CPU; of ideal: speedup x MACs kept (100% = latency fell as much "
             "as MACs).", "", HEADER]
    lines += [_fmt(r) for r in results]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

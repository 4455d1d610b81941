"""SmolLM2-135M pruned to 20% of its block parameters, then recovery within a fixed CPU time budget: LoRA with the
language-model loss, LoRA with distillation from the dense model (logit KL), and LoRA with both. Perplexity on the
BBC News test split (the training domain) and on movie-review sentences (out of domain: no step trains or
calibrates on them), so recovering general quality is told apart from adapting to BBC text.

    python benchmarks/llm_distill_recovery.py            # 20 CPU minutes per row, torch threads 2 (the issue's budget)
    python benchmarks/llm_distill_recovery.py --minutes 0.25 --test-blocks 2 --movie-blocks 2 --quick  # smoke run

The budget is CPU time of this process (``--clock cpu``: ``time.process_time``, all threads together, the teacher's
forward pass included), so a loaded shared machine gives every row the same compute and no benchmark lock is needed;
``--clock wall`` measures wall time instead (then hold ``flock /tmp/hfprune-bench.lock``).

The pruned model is the best plain checkpoint of ``benchmarks/smollm2.py`` (``fluctuation`` scores with structured
OBS, ``scope="uniform"``, 128 calibration blocks), built the same way and cached as a plain checkpoint under
``hfprune.data.assets.cache_dir()/bench``. Every recovered model is merged (``merge_and_unload``), saved through
hfprune's transactional save and reloaded with stock ``AutoModelForCausalLM`` (no remote code); its logits must
match. Writes a markdown table to ``--out`` and a JSON record beside it, after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from common import TimeLimit  # noqa: E402
from smollm2 import LORA_TARGETS, batches, block_params, check_plain, machine, n_params  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import hfprune  # noqa: E402
from hfprune.core.checkpoint import save_pruned  # noqa: E402
from hfprune.data.assets import cache_dir  # noqa: E402
from hfprune.data.movie_reviews import movie_reviews  # noqa: E402
from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir  # noqa: E402
from hfprune.distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402

METHODS = {  # name -> alpha of the distillation term (None: the stock Trainer with the LM loss)
    "lm": None,
    "distill": 1.0,
    "both": 0.5,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget of each recovery (see --clock)")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="what --minutes measures: cpu = CPU time of this process summed over its threads "
                        "(time.process_time; the same compute for every row on a loaded shared machine), wall = "
                        "wall-clock time")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--methods", default="lm,distill,both", help=f"comma-separated, from {sorted(METHODS)}")
    p.add_argument("--remove", type=float, default=0.2, help="fraction of transformer-block parameters removed")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--test-blocks", type=int, default=48, help="BBC test blocks")
    p.add_argument("--movie-blocks", type=int, default=24, help="movie-review test blocks (out of domain)")
    p.add_argument("--calibration-blocks", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="top-k logit KL (0: the full vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: do not write the results file")
    p.add_argument("--out", default="benchmarks/results/llm_distill_recovery.md")
    args = p.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    return args


def pruned_model(dense, calibration, args, probe) -> tuple:
    """The uniform fluctuation + OBS model of benchmarks/smollm2.py, from the cache when it is there."""
    total, blocks = n_params(dense), block_params(dense)
    budget = total - args.remove * blocks
    key = f"smollm2-fluctuation-obs-uniform-remove{args.remove:g}-cal{args.calibration_blocks}-seed{args.seed}"
    path = cache_dir() / "bench" / key
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), None
    model = copy.deepcopy(dense)
    config = hfprune.PruningConfig(criterion="fluctuation", params_ratio=budget / total, scope="uniform",
                                   min_heads=1, round_to=8, seed=args.seed, recovery="obs")
    result = hfprune.prune(model, calibration, config)
    check_plain(model, probe, path)  # saves there, reloads with stock transformers, compares logits
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), result.seconds


def check_saved(model, probe: dict, directory: Path) -> None:
    """hfprune's (transactional) save, then a stock reload without remote code: a plain checkpoint, same logits."""
    save_pruned(model, directory)
    if list(directory.glob("*.py")):
        raise RuntimeError(f"{directory} is not a plain checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()
    with torch.no_grad():
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded logits differ by {diff}")


def recover(method: str, pruned, dense, train, args, workdir: Path) -> tuple:
    """LoRA on every projection of a copy of ``pruned``, trained for ``args.minutes``, merged. (model, info)."""
    torch.manual_seed(args.seed)
    lora = peft.get_peft_model(copy.deepcopy(pruned), peft.LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(workdir / method), max_steps=100000, learning_rate=args.lr,
        per_device_train_batch_size=args.train_batch, lr_scheduler_type="constant_with_warmup", warmup_steps=5,
        weight_decay=0.0, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True)
    limit = TimeLimit(60 * args.minutes, clock=args.clock)
    common = dict(model=lora, args=targs, train_dataset=train, callbacks=[limit])
    alpha = METHODS[method]
    if alpha is None:
        trainer = Trainer(**common)
    else:
        cfg = DistillationConfig(alpha=alpha, temperature=args.temperature, top_k=args.top_k or None)
        trainer = DistillationTrainer(teacher=dense, distill_config=cfg, **common)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    merged = lora.merge_and_unload().eval()
    steps = trainer.state.global_step
    return merged, {"steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
                    "tokens": steps * args.train_batch * args.block_size,
                    "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    bbc = bbc_news(seed=args.seed)
    test = batches(lm_blocks(bbc["test"], tokenizer, args.block_size, max_blocks=args.test_blocks), 8)
    calibration = batches(lm_blocks(bbc["calibration"], tokenizer, args.block_size,
                                    max_blocks=args.calibration_blocks), 4)
    train = lm_blocks(bbc["train"], tokenizer, args.block_size)
    movies = movie_reviews(seed=args.seed)["test"]  # sentences, packed into blocks like the news text
    movie_test = batches(lm_blocks(datasets.Dataset.from_dict({"text": movies["text"]}), tokenizer, args.block_size,
                                   max_blocks=args.movie_blocks), 8)
    probe = {"input_ids": test[0]["input_ids"][:2, :64]}

    def evaluate(model) -> tuple:
        return perplexity(model, test)["perplexity"], perplexity(model, movie_test)["perplexity"]

    rows = []
    t = time.perf_counter()
    dense_ppl = evaluate(dense)
    eval_seconds = time.perf_counter() - t
    rows.append({"name": "dense", "params": n_params(dense), "ppl": dense_ppl, "info": None})
    print(f"dense: BBC {dense_ppl[0]:.2f}, movies {dense_ppl[1]:.2f} ({eval_seconds:.0f} s)", flush=True)
    pruned, prune_seconds = pruned_model(dense, calibration, args, probe)
    removed = 1 - block_params(pruned) / block_params(dense)
    rows.append({"name": "pruned (fluctuation + OBS, no training)", "params": n_params(pruned), "ppl": evaluate(pruned),
                 "info": None})
    print(f"pruned: {rows[-1]['ppl']}", flush=True)
    shape = (f"{pruned.config.num_hidden_layers} layers, {pruned.config.num_attention_heads} heads / "
             f"{pruned.config.num_key_value_heads} KV, FFN {pruned.config.intermediate_size}")
    context = (args, shape, removed, prune_seconds, eval_seconds, started, load_start, argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in args.methods.split(","):
            merged, info = recover(method, pruned, dense, train, args, tmp)
            check_saved(merged, probe, tmp / f"{method}-merged")
            rows.append({"name": method, "params": n_params(merged), "ppl": evaluate(merged), "info": info})
            print(f"{method}: {rows[-1]['ppl']} after {info['steps']} steps", flush=True)
            del merged
            if method != args.methods.split(",")[-1]:  # a stopped run keeps the rows that finished
                write(rows, context, partial=True)
    print(write(rows, context, partial=False))


def write(rows, context, partial: bool) -> str:
    """Render the table; unless --quick, write it (and a JSON record) to --out atomically. Returns the markdown."""
    args, shape, removed, prune_seconds, eval_seconds, started, load_start, argv = context
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report = render(args, rows, shape, removed, prune_seconds, eval_seconds, started, load_start, peak_gb, argv)
    if partial:
        report += "\nPARTIAL: written while the run was still going; the rows above are the ones that finished.\n"
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": report.split("`")[1], "args": vars(args), "load_start": load_start, "shape": shape,
                  "removed_block_fraction": removed, "eval_seconds": eval_seconds, "partial": partial,
                  "rows": [{**r, "ppl": {"bbc": r["ppl"][0], "movies": r["ppl"][1]}} for r in rows]}
        for path, text in ((out, report), (out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")):
            tmp_out = path.with_suffix(path.suffix + ".tmp")
            tmp_out.write_text(text)
            os.replace(tmp_out, path)
    return report

LABELS = {
    "lm": "LoRA, language-model loss",
    "distill": "LoRA, distillation from the dense model (logit KL only)",
    "both": "LoRA, distillation + LM loss (alpha 0.5)",
}


def render(args, rows, shape, removed, prune_seconds, eval_seconds, started, load_start, peak_gb, argv) -> str:
    dense_bbc, dense_movie = rows[0]["ppl"]
    command = "python benchmarks/llm_distill_recovery.py" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv))
    clock = "CPU time of the process (time.process_time, all threads)" if args.clock == "cpu" else "wall time"
    kl = f"top-{args.top_k} KL (with a remainder bucket)" if args.top_k else "full-vocabulary KL"
    lines = [
        f"# SmolLM2-135M-Instruct, {100 * removed:.1f}% of the block parameters removed: recovery in "
        f"{args.minutes:g} {'CPU' if args.clock == 'cpu' else 'wall-clock'} minutes",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. Load average when it started: {load_start[0]:.2f} (1 min), {load_start[1]:.2f} "
        f"(5 min) (a shared machine: other jobs ran beside it); total run {(time.perf_counter() - started) / 60:.1f} "
        f"min; peak memory {peak_gb:.1f} GB.",
        "",
        f"Pruned model: {shape} (a plain Llama checkpoint), fluctuation scores with structured OBS, "
        f"{args.calibration_blocks} calibration blocks of BBC text"
        + (f", pruned in {prune_seconds:.0f} s" if prune_seconds else " (from the cache)") + ". Recovery: LoRA "
        f"r={args.lora_r} (alpha {2 * args.lora_r}) on every projection, lr {args.lr} constant after 5 warm-up "
        f"steps, batch {args.train_batch} x {args.block_size} tokens of BBC training articles, stopped after "
        f"{args.minutes:g} min of {clock} (the first step past the budget finishes); torch threads {args.threads}; "
        f"distillation is the {kl} at temperature {args.temperature:g} from the dense model held in memory "
        "(its forward pass is part of the budget). Every recovered model was merged, saved and reloaded with stock "
        "`AutoModelForCausalLM` (no remote code) to the same logits.",
        "",
        f"Perplexity on the BBC test split ({args.test_blocks} blocks of {args.block_size} tokens) and on the "
        f"movie-review sentences of the test split ({args.movie_blocks} blocks; never trained or calibrated on). "
        f"One evaluation of both takes {eval_seconds:.0f} s here.",
        "",
        "| model | parameters | steps (tokens) | train CPU / wall min | train loss first -> last | BBC ppl | vs dense "
        "| movies ppl | vs dense |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        bbc, movie = r["ppl"]
        info = r["info"]
        name = LABELS.get(r["name"], r["name"])
        steps = "" if info is None else f"{info['steps']} ({info['tokens']:,})"
        spent = "" if info is None else f"{info['cpu_seconds'] / 60:.1f} / {info['seconds'] / 60:.1f}"
        loss = "" if info is None or info["first_loss"] is None else \
            f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}"
        rel = ("", "") if r["name"] == "dense" else (f"{100 * (bbc / dense_bbc - 1):+.1f}%",
                                                    f"{100 * (movie / dense_movie - 1):+.1f}%")
        lines.append(f"| {name} | {r['params']:,} | {steps} | {spent} | {loss} | {bbc:.2f} | {rel[0]} | {movie:.2f} | "
                     f"{rel[1]} |")
    lines += ["", "Training losses are not comparable across rows: the LM loss is a cross-entropy, distillation a "
                  "KL (plus half the cross-entropy for 'both')."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

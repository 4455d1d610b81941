"""Torch-Pruning's LLM pruner (the approach of its ``examples/LLMs/prune_llm.py``, adapted to transformers 5) beside
hfprune on SmolLM2-135M, BBC News split and test blocks of ``benchmarks/smollm2.py``, retraining-free.

    python benchmarks/tp_llm_peer.py                                    # 20% and 40% of ALL parameters removed
    python benchmarks/tp_llm_peer.py --targets 0.8 --test-blocks 4 --calibration-blocks 8 --quick   # smoke run

Torch-Pruning: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance`` (gradients of the
LM loss summed over the calibration blocks), local pruning (one ratio in every layer), whole heads
(``num_heads`` for q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False`` so RoPE is untouched) and FFN channels,
``round_to=4``, the LM head ignored: the settings of that example, except that the hidden size is kept (the example
prunes it with the same ratio; here both tools remove heads and FFN channels only). The ratio is searched on a
one-layer copy of the architecture (pruning counts do not depend on the weights) so that the pruned model's total
parameter count comes closest to ``--targets`` x the dense count; hfprune (``hfprune.prune``, ``params_ratio`` =
the count Torch-Pruning reached / dense) then gets the same budget. Rows are written to ``--out`` (markdown + JSON)
as they finish; ``--resume`` keeps the finished rows of an earlier run with the same settings.
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
import torch_pruning as tp  # noqa: E402
from smollm2 import batches, machine, n_params  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hfprune  # noqa: E402
from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402

IMPORTANCE = {"magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
              "taylor": lambda: tp.importance.GroupTaylorImportance()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="0.8,0.6", help="kept fraction of ALL parameters, comma-separated")
    p.add_argument("--importance", default="magnitude,taylor", help=f"Torch-Pruning rows, from {sorted(IMPORTANCE)}")
    p.add_argument("--hfprune", default="fluctuation:uniform,fisher:global",
                   help="hfprune rows, criterion:scope (all with recovery='obs'); empty: none")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--calibration-blocks", type=int, default=128, help="for Taylor gradients and hfprune alike")
    p.add_argument("--round-to", type=int, default=4, help="Torch-Pruning channel rounding (its LLM example: 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep finished rows of --out's JSON (same settings)")
    p.add_argument("--quick", action="store_true", help="smoke run: write nothing")
    p.add_argument("--out", default="benchmarks/results/tp_llm_peer.md")
    args = p.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    if not all(0 < t < 1 for t in targets):
        p.error(f"--targets must lie in (0, 1), got {targets}")
    bad = [m for m in args.importance.split(",") if m and m not in IMPORTANCE]
    if bad:
        p.error(f"unknown --importance {bad}; choose from {sorted(IMPORTANCE)}")
    for spec in filter(None, args.hfprune.split(",")):
        if spec.count(":") != 1 or spec.split(":")[1] not in ("uniform", "global"):
            p.error(f"--hfprune entry {spec!r} is not criterion:uniform or criterion:global")
    return args, targets


def tp_pruner(model, importance, ratio: float, head_ratio: float, round_to: int):
    """The MetaPruner of Torch-Pruning's LLM example on a (transformers 5) Llama, hidden size kept."""
    config = model.config
    num_heads, ignored = {}, [model.lm_head]
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = config.num_attention_heads
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = config.num_key_value_heads
        # o_proj / down_proj outputs are the residual stream: not roots, so the hidden size stays (see docstring)
        ignored += [attn.o_proj, layer.mlp.down_proj]
    example = torch.randint(0, config.vocab_size, (1, 16))
    return tp.pruner.MetaPruner(
        model, example_inputs=example, importance=importance, global_pruning=False, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=head_ratio, round_to=round_to,
        # transformers 5 returns a ModelOutput (Torch-Pruning's tracer wants a tensor) and would build a KV cache
        forward_fn=lambda m, x: m(x, use_cache=False), output_transform=lambda out: out.logits)


def sync_config(model) -> dict:
    """After Torch-Pruning changed the Linear shapes: write the new head / FFN counts into the config and the
    attention modules (transformers 5 reads ``num_key_value_groups`` on the module, the counts from the config).
    Returns the per-layer shapes; raises when the layers differ or the query heads do not split into KV groups."""
    config, head_dim = model.config, model.config.head_dim
    shapes = {(layer.self_attn.q_proj.out_features // head_dim, layer.self_attn.k_proj.out_features // head_dim,
               layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    if len(shapes) != 1:
        raise RuntimeError(f"layers were pruned to different shapes {sorted(shapes)}: not a plain Llama")
    (heads, kv, ffn), = shapes
    if heads % kv:
        raise RuntimeError(f"{heads} query heads do not split into {kv} key/value groups")
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = heads, kv, ffn
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = heads // kv
    return {"heads": heads, "kv_heads": kv, "ffn": ffn}


def tiny_count(config, ratio: float, head_ratio: float, round_to: int) -> tuple:
    """Parameters one layer loses at these ratios, and its (heads, kv heads): a one-layer random copy, so cheap."""
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 1, 64
    model = AutoModelForCausalLM.from_config(small, attn_implementation="eager").eval()
    before = sum(p.numel() for p in model.model.layers.parameters())
    pruner = tp_pruner(model, tp.importance.GroupMagnitudeImportance(p=2), ratio, head_ratio, round_to)
    for group in pruner.step(interactive=True):
        group.prune()
    attn = model.model.layers[0].self_attn
    heads = (attn.q_proj.out_features // config.head_dim, attn.k_proj.out_features // config.head_dim)
    return before - sum(p.numel() for p in model.model.layers.parameters()), heads


def search_ratio(config, dense_params: int, target: float, round_to: int) -> dict:
    """The Torch-Pruning ratio whose pruned model comes closest to ``target`` x the dense parameters. The example's
    setting, one ratio for heads and FFN, first; when that leaves query heads that do not split into the remaining
    KV groups (it prunes q and k/v heads independently), the head ratio steps down to the nearest consistent one
    and the FFN ratio alone is searched."""
    need = (1 - target) * dense_params / config.num_hidden_layers  # every layer loses the same at one ratio

    def bisect(head_ratio=None) -> tuple:
        lo, hi, best = 0.0, 0.95, None
        for _ in range(14):
            mid = (lo + hi) / 2
            removed, heads = tiny_count(config, mid, mid if head_ratio is None else head_ratio, round_to)
            if best is None or abs(removed - need) < abs(best[1] - need):
                best = (mid, removed, heads)
            lo, hi = (mid, hi) if removed < need else (lo, mid)
        return best

    ratio, removed, heads = bisect()
    head_ratio = ratio
    while heads[0] % heads[1]:
        head_ratio = round(head_ratio - 0.01, 2)
        heads = tiny_count(config, 0.0, head_ratio, round_to)[1]
    if head_ratio != ratio:
        ratio, removed, heads = bisect(head_ratio)
    return {"ratio": ratio, "head_ratio": head_ratio, "heads": heads}


def lm_gradients(model, calibration) -> None:
    """Sum the LM-loss gradients over the calibration batches into ``.grad`` (what GroupTaylorImportance reads)."""
    model.zero_grad()
    for batch in calibration:
        model(**batch, use_cache=False).loss.backward()


def tp_row(dense, name: str, setting: dict, calibration, args, probe) -> tuple:
    model = copy.deepcopy(dense)
    start, cpu = time.perf_counter(), time.process_time()
    pruner = tp_pruner(model, IMPORTANCE[name](), setting["ratio"], setting["head_ratio"], args.round_to)
    if name == "taylor":
        lm_gradients(model, calibration)
    q_index = {layer.self_attn.q_proj: i for i, layer in enumerate(model.model.layers)}
    k_index = {layer.self_attn.k_proj: i for i, layer in enumerate(model.model.layers)}
    removed_q, removed_kv = {}, {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:  # which heads go, to check the query -> KV group mapping afterwards
            module = dep.target.module
            if module in q_index and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed_q[q_index[module]] = {int(getattr(i, "idx", i)) // dense.config.head_dim for i in idxs}
            if module in k_index and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed_kv[k_index[module]] = {int(getattr(i, "idx", i)) // dense.config.head_dim for i in idxs}
        group.prune()
    model.zero_grad(set_to_none=True)
    shape = sync_config(model)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    with tempfile.TemporaryDirectory() as tmp:
        check_reload(model, probe, Path(tmp))
    remapped = sum(gqa_remapped(dense.config, removed_q.get(i, set()), removed_kv.get(i, set()))
                   for i in range(dense.config.num_hidden_layers))
    return model.eval(), {"shape": shape, "seconds": seconds, "cpu_seconds": cpu, "gqa_remapped_layers": remapped,
                          **setting}


def check_reload(model, probe: dict, directory: Path) -> None:
    """Save, reload with stock transformers (no remote code, the same eager attention), same logits: the config
    written by :func:`sync_config` describes the pruned weights. (Against SDPA the logits differ by ~1e-3 on these
    pruned models, by ~1e-4 on the dense one: kernel rounding, not a config mismatch.)"""
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    if list(directory.glob("*.py")) or "auto_map" in config:
        raise RuntimeError(f"{directory} is not a plain checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded logits differ by {diff}")


def gqa_remapped(config, removed_q: set, removed_kv: set) -> bool:
    """Whether, after removing these heads, some kept query head reads a different key/value head than before:
    the pruned model maps kept query j to kept KV j // (kept q / kept kv), the dense one query h to h // (q / kv)."""
    group = config.num_attention_heads // config.num_key_value_heads
    kept_q = [h for h in range(config.num_attention_heads) if h not in removed_q]
    kept_kv = [h for h in range(config.num_key_value_heads) if h not in removed_kv]
    new_group = len(kept_q) // len(kept_kv)
    return any(h // group != kept_kv[j // new_group] for j, h in enumerate(kept_q))


def hfprune_row(dense, spec: str, params: int, calibration, args) -> tuple:
    """hfprune's best retraining-free settings (benchmarks/results/smollm2_obs*.md: structured OBS) at ``params``."""
    criterion, scope = spec.split(":")
    model = copy.deepcopy(dense)
    config = hfprune.PruningConfig(criterion=criterion, params_ratio=params / n_params(dense), scope=scope,
                                   min_heads=1, round_to=8, seed=args.seed, recovery="obs")
    start, cpu = time.perf_counter(), time.process_time()
    result = hfprune.prune(model, calibration, config)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    heads = sorted({layer.self_attn.q_proj.out_features // dense.config.head_dim for layer in model.model.layers})
    ffn = sorted({layer.mlp.gate_proj.out_features for layer in model.model.layers})
    shape = {"heads": heads if len(heads) > 1 else heads[0], "ffn": ffn if len(ffn) > 1 else ffn[0]}
    del result
    return model.eval(), {"shape": shape, "seconds": seconds, "cpu_seconds": cpu}


def main(argv=None) -> None:
    args, targets = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # eager attention: Torch-Pruning traces through SDPA as if it were elementwise and then couples the query and
    # key/value channels into one group (num_heads 9 vs 3 channels: a shape error); the eager matmuls trace cleanly
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    data = bbc_news(seed=args.seed)  # the split, blocks and batching of benchmarks/smollm2.py
    test = batches(lm_blocks(data["test"], tokenizer, args.block_size, max_blocks=args.test_blocks), 8)
    calibration = batches(lm_blocks(data["calibration"], tokenizer, args.block_size,
                                    max_blocks=args.calibration_blocks), 4)
    probe = {"input_ids": test[0]["input_ids"][:2, :64]}
    settings = {k: getattr(args, k) for k in ("block_size", "test_blocks", "calibration_blocks", "round_to", "seed")}
    out = Path(args.out)
    rows = {}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["settings"] == settings:
            rows = {r["key"]: r for r in old["rows"]}
    context = {"args": args, "settings": settings, "load_start": load_start, "started": started, "argv": argv}

    def add(key: str, label: str, model, info: dict) -> None:
        info = {"key": key, "label": label, "params": n_params(model), "ppl": perplexity(model, test)["perplexity"],
                **info}
        rows[key] = info
        print(f"{label}: {info['params']:,} params, ppl {info['ppl']:.2f}", flush=True)
        write(rows, context)

    if "dense" not in rows:
        add("dense", "dense", dense, {"shape": {"heads": dense.config.num_attention_heads,
                                                "kv_heads": dense.config.num_key_value_heads,
                                                "ffn": dense.config.intermediate_size}})
    total = n_params(dense)
    for target in targets:
        setting = search_ratio(dense.config, total, target, args.round_to)
        reached = None
        for name in filter(None, args.importance.split(",")):
            key = f"{target:g}/tp/{name}"
            if key not in rows:
                model, info = tp_row(dense, name, setting, calibration, args, probe)
                add(key, f"Torch-Pruning, {name}", model, {"target": target, **info})
                del model
            reached = rows[key]["params"]
        if reached is None:  # no Torch-Pruning rows: hfprune at the target itself
            reached = round(target * total)
        for spec in filter(None, args.hfprune.split(",")):
            key = f"{target:g}/hfprune/{spec}"
            if key not in rows:
                model, info = hfprune_row(dense, spec, reached, calibration, args)
                criterion, scope = spec.split(":")
                add(key, f"hfprune, {criterion} + OBS, scope {scope}", model, {"target": target, **info})
                del model
    print(write(rows, context))


def write(rows: dict, context: dict) -> str:
    args = context["args"]
    report = render(rows, context)
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"settings": context["settings"], "load_start": context["load_start"], "machine": machine(),
                  "command": command(args, context["argv"]), "rows": list(rows.values())}
        for path, text in ((out, report), (out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    return report


def command(args, argv) -> str:
    return "python benchmarks/tp_llm_peer.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))


def shape_text(shape: dict) -> str:
    kv = f" / {shape['kv_heads']} KV" if "kv_heads" in shape else ""
    return f"heads {shape['heads']}{kv}, FFN {shape['ffn']}"


def render(rows: dict, context: dict) -> str:
    args, load = context["args"], context["load_start"]
    dense = rows["dense"]
    lines = [
        "# Torch-Pruning's LLM pruner beside hfprune: SmolLM2-135M-Instruct, BBC News, retraining-free",
        "",
        f"Command: `{command(args, context['argv'])}`",
        "",
        f"Machine: {machine()}, torch-pruning {tp.__version__}. Load average when it started: {load[0]:.2f} (1 min), "
        f"{load[1]:.2f} (5 min): a shared machine, so the wall times are loaded ones; CPU seconds (all threads) "
        f"beside them. Total run {(time.perf_counter() - context['started']) / 60:.1f} min"
        + (" (resumed; earlier rows from the previous run)" if args.resume else "") + ".",
        "",
        f"Data: the split of `benchmarks/smollm2.py` (seed {args.seed}); test perplexity on the first "
        f"{args.test_blocks} blocks of {args.block_size} tokens of the BBC test articles; {args.calibration_blocks} "
        "calibration blocks (Taylor gradients and hfprune alike). Parameters count everything (embeddings too, tied "
        "to the LM head, never pruned). Torch-Pruning's ratio was searched so its count comes closest to the target; "
        "hfprune got that reached count as its budget.",
        "",
        "| removed (target) | method | structure | parameters | removed | test perplexity | vs dense | prune s "
        "(CPU s) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows.values():
        target = f"{100 * (1 - r['target']):.0f}%" if "target" in r else ""
        removed = 1 - r["params"] / dense["params"]
        rel = "" if r["key"] == "dense" else f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%"
        time_text = f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})" if "seconds" in r else ""
        notes = ""
        if "ratio" in r:
            notes = (f"pruning_ratio {r['ratio']:.4f}, head_pruning_ratio {r['head_ratio']:.2f}; query heads "
                     f"reading another KV head than before in {r['gqa_remapped_layers']}/30 layers")
        lines.append(f"| {target} | {r['label']} | {shape_text(r['shape'])} | {r['params']:,} | {100 * removed:.1f}% "
                     f"| {r['ppl']:.2f} | {rel} | {time_text} | {notes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

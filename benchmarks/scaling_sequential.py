"""Scaling of sequential (layer-by-layer) pruning against in-memory pruning, on random-initialised Llama-shaped
models saved to disk, with real calibration text (BBC News, tokenised with SmolLM2's tokenizer).

    OMP_NUM_THREADS=2 python benchmarks/scaling_sequential.py                 # 0.1b, SmolLM2, 0.5b, 1.1b
    OMP_NUM_THREADS=2 python benchmarks/scaling_sequential.py --sizes 0.1b,smollm2,0.5b
    OMP_NUM_THREADS=2 python benchmarks/scaling_sequential.py --sizes "" --limit-size 1.1b --limit-gib 3.5 \
        --results benchmarks/results/scaling_sequential_limit.md

Each case prunes to 80% of the parameters, scope uniform, criterion fluctuation, recovery OBS, in a subprocess of
its own (both paths of a model while holding /tmp/hfprune-bench.lock), so wall time and peak resident memory
(``ru_maxrss`` of that process, from ``os.wait4``) are the operating system's. The sequential run of ``--limit-size``
runs under a memory limit (a memory cgroup, ``--limit-gib``) smaller than the model's weight bytes; the in-memory run
of that size is also tried under the limit. Then the two outputs are compared tensor by tensor and the sequential one
is reloaded with stock transformers. The table goes to stdout and benchmarks/results/scaling_sequential.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {  # hidden, layers, FFN, heads, kv heads; SmolLM2's vocabulary (49,152) so its tokenizer fits
    "0.1b": (768, 12, 2048, 12, 4),
    "0.5b": (1536, 16, 4096, 16, 4),
    "1.1b": (2048, 22, 5632, 32, 4),  # TinyLlama-1.1B's shape
    "1.1b-2l": (2048, 2, 5632, 32, 4),  # its layers, two of them: peak memory at that layer size, in less time
}
SETTINGS = dict(criterion="fluctuation", params_ratio=0.8, scope="uniform", recovery="obs")
ROOT = Path(__file__).resolve().parent
LOCK = "/tmp/hfprune-bench.lock"


def cache() -> Path:
    from hfprune.data.assets import cache_dir

    return cache_dir() / "scaling"


def calibration_file(samples: int, seq_len: int) -> Path:
    """The calibration blocks, tokenised once by the driver into a safetensors file, so that the workers' peak
    memory is the pruning's, not the tokenizer's and the datasets library's (about 0.24 GiB here)."""
    target = cache() / f"calibration-bbc-{samples}x{seq_len}.safetensors"
    if not target.exists():
        import torch
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        from hfprune.data.text import bbc_news, lm_blocks, smollm2_dir

        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        blocks = lm_blocks(bbc_news(0)["calibration"], tokenizer, seq_len, max_blocks=samples)
        rows = [blocks[i] for i in range(len(blocks))]
        if len(rows) < samples:
            raise ValueError(f"BBC News gave {len(rows)} blocks of {seq_len} tokens, fewer than --samples {samples}")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "attention_mask")},
                  str(target))
    return target


def calibration(samples: int, seq_len: int, batch_size: int = 8) -> list:
    from safetensors.torch import load_file

    rows = load_file(str(calibration_file(samples, seq_len)))
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, samples, batch_size)]


def make(size: str, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, ffn, heads, kv = SHAPES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="200MB")  # shards: no file larger than a layer's worth


# ---- workers (one subprocess each) ----------------------------------------------------------------------------


def worker(args) -> None:
    import torch

    import hfprune
    from hfprune.pruning.sequential import prune_sequential

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    source, out = Path(args.source), Path(args.out)
    batches = calibration(args.samples, args.seq_len)
    import resource

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # imports and calibration, before pruning
    start = time.perf_counter()
    if args.worker == "memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        result = hfprune.prune(model, batches, hfprune.PruningConfig(**{**SETTINGS, "recovery": args.recovery}))
        model.save_pretrained(out)
    else:
        config = hfprune.PruningConfig(**{**SETTINGS, "recovery": args.recovery})
        result = prune_sequential(source, batches, config, out, offload_dir=args.offload_dir)
    print(json.dumps({"seconds": time.perf_counter() - start, "before": result.before.params,
                      "after": result.after.params, "base_rss_gib": base}))


def compare(args) -> None:
    """Tensor by tensor (one at a time, so two pruned 1B models need not fit), then a reload of the sequential
    output with stock transformers and its loss on a calibration batch."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def tensors(folder):
        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"] \
            if (Path(folder) / "model.safetensors.index.json").exists() else None
        files = sorted(set(index.values())) if index else ["model.safetensors"]
        for name in files:
            with safe_open(Path(folder) / name, "pt") as f:
                for key in f.keys():
                    yield key, f, name

    result = {}
    if args.source:
        other = {key: (Path(args.out) / name) for key, _, name in tensors(args.out)}
        worst, count = 0.0, 0
        for key, f, _ in tensors(args.source):
            with safe_open(other[key], "pt") as g:
                worst = max(worst, float((f.get_tensor(key) - g.get_tensor(key)).abs().max()))
            count += 1
        assert count == len(other), "different tensor sets"
        result.update(max_abs_diff=worst, tensors=count)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    batch = calibration(args.samples, args.seq_len)[0]
    with torch.no_grad():
        loss = float(model(**batch, labels=batch["input_ids"]).loss)
    print(json.dumps({**result, "reload_loss": loss}))


# ---- driver --------------------------------------------------------------------------------------------------


def run_child(cmd: list, limit_gib: float | None = None) -> tuple:
    """Run ``cmd``: ``(last JSON line of its stdout with the CPU seconds it used, its peak RSS in GiB, wall
    seconds, exit code)``, all from ``os.wait4``."""
    group = None
    if limit_gib:  # a memory cgroup (v1 here): what the kernel lets the process hold, page cache included
        group = Path(f"/sys/fs/cgroup/memory/hfprune-seqbench-{os.getpid()}")
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gib * 2**30)))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
        # page cache is charged to the cgroup that first reads a page: a checkpoint already cached (charged to
        # another group) would be free to map, so the clean cache goes first
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []

    def drain(stream, sink):
        for line in stream:
            sink.append(line)

    threads = [threading.Thread(target=drain, args=(proc.stdout, out)),
               threading.Thread(target=drain, args=(proc.stderr, err))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if group is not None:
        group.rmdir()  # the cgroup this function made, now empty
    lines = [line for line in out if line.startswith("{")]
    if proc.returncode != 0:
        sys.stderr.write("".join(err)[-2000:])
    info = json.loads(lines[-1]) if lines else {}
    info["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # what contention with other jobs does not inflate
    return info, usage.ru_maxrss / 2**20, seconds, proc.returncode


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.1b,smollm2,0.5b,1.1b", help="0.1b, 0.5b, 1.1b (random Llamas), smollm2")
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per calibration block")
    parser.add_argument("--limit-size", default=None, help="a size pruned layer by layer under --limit-gib (a memory "
                        "cgroup), then tried in memory under it, then reloaded")
    parser.add_argument("--limit-gib", type=float, default=None)
    parser.add_argument("--paths", default="memory,sequential", help="which paths to run (memory, sequential)")
    parser.add_argument("--memory-sizes", default=None, help="sizes that also run the in-memory path (default: "
                        "all of --sizes when --paths has memory)")
    parser.add_argument("--recovery", default="obs", help="obs (the table) or none (fluctuation scores only)")
    parser.add_argument("--results", default=str(ROOT / "results" / "scaling_sequential.md"), help="table file; "
                        "the rows also go to the same name with .json")
    parser.add_argument("--append", action="store_true", help="keep the rows of the results' .json file that this "
                        "run does not measure again")
    parser.add_argument("--merge", default=None, help="comma-separated .json row files of earlier runs: write their "
                        "rows as one table to --results, measuring nothing")
    parser.add_argument("--no-lock", action="store_true", help="do not wait for the benchmark lock (timings are then "
                        "taken beside whatever else runs; the load average is recorded)")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--source", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--offload_dir", default=None)
    args = parser.parse_args()
    if args.worker == "make":
        return make(args.source, Path(args.out))
    if args.worker == "compare":
        return compare(args)
    if args.worker:
        return worker(args)

    if args.merge:
        rows = [r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())["rows"]]
        return write(rows, args, None)
    calibration_file(args.samples, args.seq_len)  # tokenised here, once: the workers read the tokens
    py = [sys.executable, __file__, "--samples", str(args.samples), "--seq_len", str(args.seq_len), "--recovery",
          args.recovery]
    store = Path(args.results).with_suffix(".json")
    rows = json.loads(store.read_text())["rows"] if args.append and store.exists() else []
    started = os.getloadavg()
    memory_sizes = args.memory_sizes.split(",") if args.memory_sizes is not None else None
    for size in [x for x in args.sizes.split(",") if x] + ([args.limit_size] if args.limit_size else []):
        source = smollm2() if size == "smollm2" else cache() / f"llama-{size}"
        if not (source / "config.json").exists():
            print(f"making {size} in {source}", flush=True)
            subprocess.run([*py, "--worker", "make", "--source", size, "--out", str(source)], check=True)
        limited = size == args.limit_size and args.limit_gib
        lock = open(LOCK, "w")  # held for both paths of one model, so they are timed under the same conditions
        if not args.no_lock:
            print(f"waiting for {LOCK}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        outs, mine = {}, []
        paths = [p for p in args.paths.split(",") if p != "memory" or memory_sizes is None or size in memory_sizes]
        # the limited model: sequential under the limit, then in-memory under it (to show it does not fit)
        for path in ("sequential", "memory") if limited else paths:
            out = outs[path] = cache() / "out" / f"{size}-{path}"
            subprocess.run(["rm", "-rf", str(out)], check=True)  # our own output folder of the previous run
            cmd = [*py, "--worker", path, "--source", str(source), "--out", str(out)]
            load = os.getloadavg()[0]
            info, rss, seconds, rc = run_child(cmd, args.limit_gib if limited else None)
            config = json.loads((source / "config.json").read_text())
            row = {"model": "SmolLM2-135M" if size == "smollm2" else size, "path": path,
                   "layers": config["num_hidden_layers"], "weights_gib": folder_bytes(source) / 2**30,
                   "seconds": seconds, "load": (load + os.getloadavg()[0]) / 2, "rss_gib": rss, "rc": rc,
                   "base_rss_gib": info.get("base_rss_gib"), "limit_gib": args.limit_gib if limited else None,
                   "ckpt_gib": folder_bytes(out) / 2**30 if rc == 0 else None, "params": info.get("before"),
                   "after": info.get("after"), "cpu": info["cpu_seconds"], "recovery": args.recovery,
                   "samples": args.samples, "seq_len": args.seq_len}
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            mine.append(row)
            print(row, flush=True)
            if limited and rc != 0:
                break  # the in-memory try under the limit only means something beside a sequential run that fit
        lock.close()  # releases it
        seq = next((r for r in mine if r["path"] == "sequential"), {})
        if limited and seq.get("rc") == 0:  # reloads with stock transformers (outside the limit)
            info, _, _, rc = run_child([*py, "--worker", "compare", "--out", str(outs["sequential"])])
            seq.update(**info, compare_rc=rc)
        elif len(outs) == 2 and all(r["rc"] == 0 for r in mine):
            same = json.loads((outs["memory"] / "prune_plan.json").read_text())["layers"] == \
                json.loads((outs["sequential"] / "prune_plan.json").read_text())["layers"]
            info, _, _, rc = run_child([*py, "--worker", "compare", "--source", str(outs["memory"]),
                                        "--out", str(outs["sequential"])])
            seq.update(same_plan=same, **info, compare_rc=rc)
        print(seq if seq else mine[-1], flush=True)
        store.parent.mkdir(exist_ok=True)
        store.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        write(rows, args, started)


def _key(row: dict) -> tuple:
    return row["model"], row["path"], row["limit_gib"], row.get("recovery"), row.get("samples"), row.get("seq_len")


def smollm2() -> Path:
    from hfprune.data.text import smollm2_dir

    return smollm2_dir()


def write(rows: list, args, started: tuple) -> None:
    import torch
    import transformers

    head = ("| model | layers | weights (GiB) | path | recovery | CPU (s) | CPU s / layer | wall (s) | load avg | "
            "RSS before pruning (GiB) | peak RSS (GiB) | peak RSS / weights | checkpoint (GiB) | "
            "params after / before | same plan, max weight diff | reloaded loss |")
    lines = [head, "|---" * 16 + "|"]
    if started is None:  # merged rows: the settings differ per row
        head = head.replace("| path | recovery |", "| path | recovery | calibration |")
        lines = [head, "|---" * 17 + "|"]
    for r in rows:
        path = r["path"] + (f" (memory cgroup limit {r['limit_gib']:g} GiB)" if r["limit_gib"] else "")
        base = f"{r['base_rss_gib']:.2f}" if r.get("base_rss_gib") is not None else ""
        calib = f" {r['samples']} x {r['seq_len']} |" if started is None else ""
        start = (f"| {r['model']} | {r['layers']} | {r['weights_gib']:.2f} | {path} | {r.get('recovery', '')} |"
                 f"{calib} {r['cpu']:.0f} | {r['cpu'] / r['layers']:.1f} |")
        if r["rc"] != 0:
            lines.append(f"{start} failed after {r['seconds']:.0f} s (rc {r['rc']}) | {r['load']:.1f} | {base} | "
                         f"{r['rss_gib']:.2f} | {r['rss_gib'] / r['weights_gib']:.2f} | | | | |")
            continue
        ratio = f"{r['after'] / r['params']:.3f}" if r.get("params") else ""
        same = f"{r['same_plan']}, {r['max_abs_diff']:.1e}" if "same_plan" in r else ""
        loss = f"{r['reload_loss']:.3f}" if "reload_loss" in r else ""
        lines.append(f"{start} {r['seconds']:.0f} | {r['load']:.1f} | {base} | {r['rss_gib']:.2f} | "
                     f"{r['rss_gib'] / r['weights_gib']:.2f} | {r['ckpt_gib']:.2f} | {ratio} | {same} | {loss} |")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}, "
               f"transformers {transformers.__version__}")
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')} python benchmarks/scaling_sequential.py "
               + " ".join(sys.argv[1:]))
    settings = {**SETTINGS, "recovery": args.recovery}
    lock = "no benchmark lock (other jobs ran alongside: see the load average)" if args.no_lock else \
        f"holding {LOCK}"
    if started is None:
        text = (f"# Sequential vs in-memory pruning (merged)\n\n`{command}`: the rows of {args.merge}, each measured "
                f"by the command its file names.\n\n{machine}; {SETTINGS} but for the recovery column; BBC News "
                "calibration (blocks x tokens); float32.\n\n" + "\n".join(lines) + "\n")
    else:
        text = (f"# Sequential vs in-memory pruning\n\nLast command: `{command}` (load average at its start "
                f"{started[0]:.1f} / {started[1]:.1f} / {started[2]:.1f})\n\n{machine}; {lock}; {args.samples} "
                f"calibration blocks of {args.seq_len} tokens (BBC News); {settings}; float32.\n\n"
                + "\n".join(lines) + "\n")
    print(text)
    target = Path(args.results)
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)


if __name__ == "__main__":
    main()

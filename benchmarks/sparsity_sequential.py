"""Weight-level sparsity layer by layer from disk (``sparsify_sequential``) against in memory (``hfprune.sparsify``
then ``save_sparse``): peak memory, time, and whether the two checkpoints are bit-identical.

    OMP_NUM_THREADS=1 python benchmarks/sparsity_sequential.py                      # SmolLM2-135M, 0.1b, 0.5b
    OMP_NUM_THREADS=1 python benchmarks/sparsity_sequential.py --sizes 1.1b --patterns unstructured,2:4 --append

SparseGPT at 50% (``--patterns``: unstructured and/or 2:4), every decoder-layer projection, float32, on the same
BBC News blocks for both paths (tokenised once by the driver, as ``scaling_sequential.py`` does, whose models,
calibration file and child-process runner this reuses). Each path runs in a child process of its own (both paths of
a model while holding /tmp/hfprune-bench.lock unless ``--no-lock``), so peak resident memory (``ru_maxrss``) and CPU
seconds come from ``os.wait4``. Then every safetensors tensor of the two output folders is compared (``torch.equal``
and dtype, one tensor at a time) with ``config.json`` and ``sparsity_plan.json``. The table goes to stdout and
benchmarks/results/sparsity_sequential.md, the rows to the .json beside it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from scaling_sequential import LOCK, ROOT, cache, calibration_file, folder_bytes, make, run_child, smollm2

SIZES = {"smollm2": "SmolLM2-135M"}  # display names; the others (0.1b, 0.5b, 1.1b) are scaling_sequential's SHAPES


def batches(path: Path, batch_size: int = 8) -> list:
    from safetensors.torch import load_file

    rows = load_file(str(path))
    n = len(rows["input_ids"])
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def worker(args) -> None:
    """One path in this process; prints one JSON line (pruning seconds, overall sparsity, RSS before pruning)."""
    import resource

    import torch

    import hfprune
    from hfprune.pruning.sparsity import SparsityConfig, save_sparse
    from hfprune.pruning.sparsity.sequential import sparsify_sequential

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    calib = batches(Path(args.calibration))
    config = SparsityConfig(criterion="sparsegpt", sparsity=0.5, pattern=args.pattern)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # imports and tokens, before any weight
    start = time.perf_counter()
    if args.worker == "memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32)
        result = hfprune.sparsify(model, calib, config)
        save_sparse(model, args.out)
    else:  # on the CPU, as the in-memory run: other kernels would round differently
        result = sparsify_sequential(args.source, calib, config, args.out, dtype=torch.float32, device="cpu")
    print(json.dumps({"seconds": time.perf_counter() - start, "sparsity": result.plan.sparsity,
                      "base_rss_gib": base}))


def identical(a: Path, b: Path) -> dict:
    """Every tensor of the safetensors files in ``a`` and ``b`` (any sharding) equal in key, dtype and bits, one
    tensor at a time; plus ``config.json`` and ``sparsity_plan.json`` equal as JSON."""
    import torch
    from safetensors import safe_open

    def where(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    left, right = where(Path(a)), where(Path(b))
    same = sorted(left) == sorted(right)
    differing = [] if same else sorted(set(left) ^ set(right))[:3]
    for key in sorted(set(left) & set(right)):
        with safe_open(left[key], "pt") as f, safe_open(right[key], "pt") as g:
            x, y = f.get_tensor(key), g.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x, y):
                differing.append(key)
    files = {n: json.loads((Path(a) / n).read_text()) == json.loads((Path(b) / n).read_text())
             for n in ("config.json", "sparsity_plan.json")}
    return {"identical": same and not differing and all(files.values()), "tensors": len(left),
            "differing": differing[:3], "json_equal": files}


def driver_rss() -> float:
    """This process's peak RSS (GiB). A child's ``ru_maxrss`` starts at its parent's peak (fork copies the
    high-water mark, exec keeps it), so the driver runs nothing big itself; each row records this floor."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(name: str, source: Path, calib: Path, pattern: str, out_root: Path, py: list, lock: bool = False) -> list:
    """Both paths of one model and pattern on the token blocks in ``calib``, each in a child process, then the
    comparison: two rows."""
    with open(calib, "rb") as f:  # the safetensors header, read without importing torch into the driver
        samples, seq_len = json.loads(f.read(int.from_bytes(f.read(8), "little")))["input_ids"]["shape"]
    holder = open(LOCK, "w")
    if lock:  # held for both paths, so they are timed under the same conditions
        fcntl.flock(holder, fcntl.LOCK_EX)
    config = json.loads((source / "config.json").read_text())
    rows, outs = [], {}
    try:
        for path in ("memory", "sequential"):
            out = outs[path] = out_root / f"{name}-{pattern.replace(':', 'of')}-{path}"
            if out.exists():  # our own output of a previous run
                subprocess.run(["rm", "-rf", str(out)], check=True)
            load, floor = os.getloadavg(), driver_rss()
            info, rss, seconds, rc = run_child([*py, "--worker", path, "--source", str(source), "--out", str(out),
                                                "--calibration", str(calib), "--pattern", pattern])
            rows.append({"model": SIZES.get(name, name), "pattern": pattern, "path": path,
                         "layers": config["num_hidden_layers"], "samples": samples, "seq_len": seq_len,
                         "weights_gib": folder_bytes(source) / 2**30,
                         "cpu": info["cpu_seconds"], "seconds": seconds, "load": load, "rss_gib": rss, "rc": rc,
                         "driver_rss_gib": floor,
                         "base_rss_gib": info.get("base_rss_gib"), "sparsity": info.get("sparsity"),
                         "ckpt_gib": folder_bytes(out) / 2**30 if rc == 0 else None})
            print(rows[-1], flush=True)
    finally:
        holder.close()
    if all(r["rc"] == 0 for r in rows):  # in a child too: see driver_rss
        info, _, _, rc = run_child([*py, "--worker", "compare", "--source", str(outs["memory"]),
                                    "--out", str(outs["sequential"])])
        rows[1].update(identical=False, tensors=0, differing=[f"compare failed (rc {rc})"], json_equal={})
        rows[1].update({k: info[k] for k in ("identical", "tensors", "differing", "json_equal") if k in info})
        print({k: rows[1][k] for k in ("identical", "tensors", "differing", "json_equal")}, flush=True)
    return rows


def table(rows: list) -> str:
    lines = ["| model | layers | weights (GiB) | pattern | calibration | path | CPU (s) | wall (s) | "
             "load avg at start | RSS before (GiB) | peak RSS (GiB) | peak RSS / weights | checkpoint (GiB) | "
             "sparsity | bit-identical to in memory |", "|---" * 15 + "|"]
    for r in rows:
        start = (f"| {r['model']} | {r['layers']} | {r['weights_gib']:.2f} | {r['pattern']} | "
                 f"{r['samples']} x {r['seq_len']} | {r['path']} | "
                 f"{r['cpu']:.0f} | {r['seconds']:.0f} | {r['load'][0]:.1f} | {r['base_rss_gib'] or 0:.2f} | "
                 f"{r['rss_gib']:.2f} | {r['rss_gib'] / r['weights_gib']:.2f} |")
        if r["rc"] != 0:
            lines.append(f"{start} failed (rc {r['rc']}) | | |")
            continue
        same = "reference" if r["path"] == "memory" else ""
        if "identical" in r:
            same = f"{'yes' if r['identical'] else 'NO ' + ', '.join(r['differing'])} ({r['tensors']} tensors)"
        lines.append(f"{start} {r['ckpt_gib']:.2f} | {r['sparsity']:.4f} | {same} |")
    return "\n".join(lines)


def write(rows: list, args, started: tuple) -> str:
    from importlib.metadata import version  # not torch itself: see driver_rss

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    command = f"OMP_NUM_THREADS={threads} python benchmarks/sparsity_sequential.py " + " ".join(sys.argv[1:])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    machine = (f"{cpu}, {os.cpu_count()} CPUs shared with other jobs, "
               f"OMP_NUM_THREADS={threads}, torch {version('torch')}, transformers {version('transformers')}")
    lock = "no benchmark lock" if args.no_lock else f"holding {LOCK} per model"
    text = (f"# Weight sparsity layer by layer from disk vs in memory\n\nLast command: `{command}` (load average at "
            f"its start {started[0]:.1f} / {started[1]:.1f} / {started[2]:.1f}); rows kept from earlier runs carry "
            f"their own load average.\n\n{machine}; {lock}. SparseGPT, sparsity 0.5, every decoder-layer projection, "
            f"float32; calibration: BBC News blocks x tokens (the same tokens for both paths). "
            "Memory path: `from_pretrained` + `hfprune.sparsify` + `save_sparse`; sequential: `sparsify_sequential`."
            " Peak RSS and CPU seconds of each path's own process (`os.wait4`); a child's peak RSS starts at its "
            "parent's, and the driver's peak was at most "
            f"{max(r.get('driver_rss_gib') or 0 for r in rows):.2f} GiB.\n\n" + table(rows) + "\n")
    target = Path(args.results)
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)
    target.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="smollm2,0.1b,0.5b", help="smollm2, 0.1b, 0.5b, 1.1b (random Llamas)")
    parser.add_argument("--patterns", default="unstructured", help="comma-separated: unstructured, 2:4")
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per calibration block")
    parser.add_argument("--results", default=str(ROOT / "results" / "sparsity_sequential.md"))
    parser.add_argument("--append", action="store_true", help="keep the rows of the results' .json that this run "
                        "does not measure again")
    parser.add_argument("--no-lock", action="store_true", help="do not wait for the benchmark lock")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--source", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--calibration", default=None)
    parser.add_argument("--pattern", default="unstructured")
    args = parser.parse_args()
    if args.worker == "compare":
        return print(json.dumps(identical(Path(args.source), Path(args.out))))
    if args.worker == "tokens":
        return print(calibration_file(args.samples, args.seq_len))
    if args.worker == "make":
        return make(args.source, Path(args.out))
    if args.worker:
        return worker(args)
    sizes = [s for s in args.sizes.split(",") if s]
    patterns = [p for p in args.patterns.split(",") if p]
    if bad := [s for s in sizes if s not in ("smollm2", "0.1b", "0.5b", "1.1b")]:
        raise SystemExit(f"--sizes {','.join(bad)}: allowed are smollm2, 0.1b, 0.5b, 1.1b")
    if bad := [p for p in patterns if p not in ("unstructured", "2:4")]:
        raise SystemExit(f"--patterns {','.join(bad)}: allowed are unstructured, 2:4")
    started = os.getloadavg()
    py = [sys.executable, __file__]
    # tokenised once, in a child like everything that takes memory here: see driver_rss
    calib = Path(subprocess.run([*py, "--worker", "tokens", "--samples", str(args.samples), "--seq_len",
                                 str(args.seq_len)], check=True, capture_output=True, text=True).stdout.strip())
    store = Path(args.results).with_suffix(".json")
    rows = json.loads(store.read_text())["rows"] if args.append and store.exists() else []
    for size in sizes:
        source = smollm2() if size == "smollm2" else cache() / f"llama-{size}"
        if not (source / "config.json").exists():
            print(f"making {size} in {source}", flush=True)
            subprocess.run([*py, "--worker", "make", "--source", size, "--out", str(source)], check=True)
        for pattern in patterns:
            new = measure(size, source, calib, pattern, cache() / "out" / "sparsity", py, lock=not args.no_lock)
            keys = {_key(r) for r in new}
            rows = [r for r in rows if _key(r) not in keys] + new
            write(rows, args, started)
    print(write(rows, args, started))


def _key(row: dict) -> tuple:
    return row["model"], row["pattern"], row["path"], row["samples"], row["seq_len"]


if __name__ == "__main__":
    main()

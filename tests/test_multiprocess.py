"""Two gloo processes on CPU (torchrun) prune and distil exactly like one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "mp_train.py"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(launcher: list, out: Path, per_device_batch: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = launcher + [str(SCRIPT), "--out", str(out), "--per-device-batch", str(per_device_batch), "--ga", "2",
                      *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def close(a: dict, b: dict, tol: float) -> bool:
    return a.keys() == b.keys() and all(abs(x - y) <= tol * (1 + abs(x)) for k in a for x, y in zip(a[k], b[k]))


def torchrun() -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def test_two_processes_match_each_other_and_one_process(tmp_path):
    run(torchrun(), tmp_path / "two", per_device_batch=4)  # global batch 2 x 4, accumulated twice
    run([sys.executable], tmp_path / "one", per_device_batch=8)
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1)
    # identical across ranks, bit for bit
    assert r0["plan"] == r1["plan"]
    assert r0["model"]["sha256"] == r1["model"]["sha256"]
    assert r0["projection"]["sha256"] == r1["projection"]["sha256"]
    # and the same as one process on the same global batches (float tolerance: reduction order differs)
    assert r0["plan"] == one["plan"]
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in one["plan"]["layers"])
    assert close(r0["model"]["sums"], one["model"]["sums"], 1e-4)
    assert close(r0["projection"]["sums"], one["projection"]["sums"], 1e-4)
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-4)


def test_calibration_scoring_with_two_processes_matches_one_process(tmp_path):
    """PruningCallback(calibration=...) under DDP: each rank scores its shard, the scores are summed across ranks,
    so two processes pick the plan one process picks from all the calibration examples."""
    run(torchrun(), tmp_path / "two", 4, "--mode", "prune", "--calibration")
    run([sys.executable], tmp_path / "one", 8, "--mode", "prune", "--calibration")
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert r0["plan"] == r1["plan"] == one["plan"]
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in one["plan"]["layers"])
    assert r0["model"]["sha256"] == r1["model"]["sha256"]
    assert close(r0["model"]["sums"], one["model"]["sums"], 1e-4)

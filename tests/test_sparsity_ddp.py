"""One PruningCallback pruning heads, neurons and single weights (gradual magnitude sparsity) under DDP with two
gloo processes on CPU (torchrun) and gradient accumulation: after every optimizer step the masked weights are exactly
zero on both ranks, the masks and weights are the same on both ranks at every step, and so is the sliced model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_multiprocess import free_port

SCRIPT = Path(__file__).parent / "scripts" / "mp_sparsity.py"
ROOT = Path(__file__).parent.parent


def test_two_ranks_keep_masked_weights_zero_and_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), "--out", str(tmp_path), "--per-device-batch", "4",
           "--ga", "2", "--steps", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    for r in (r0, r1):
        assert r["events"] == [[2, 4], [2, 4]]
        assert len(r["nonzero_masked"]) == 6 and set(r["nonzero_masked"]) == {0}  # after every optimizer step
        assert set(r["structure_nonzero"]) == {0}
        assert r["sparsity"] == sorted(r["sparsity"]) and r["sparsity"][-1] == pytest.approx(0.6, abs=0.01)
        assert all(z == pytest.approx(0.6, abs=0.02) for z in r["final_zeros"].values())
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in r0["plan"]["layers"])
    # the same on both ranks, bit for bit, at every step and at the end (after slicing)
    assert r0["masks"] == r1["masks"] and len(set(r0["masks"])) == 3  # dense, then two pruning steps
    assert r0["weights"] == r1["weights"]
    assert r0["plan"] == r1["plan"]
    assert r0["final_masks"] == r1["final_masks"] and r0["final_weights"] == r1["final_weights"]

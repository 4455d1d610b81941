"""Score reduction across 2 real processes (torchrun, gloo, CPU): every rank picks the same plan, and the
reduced scores equal a single process scoring all the batches."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "score_distributed.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if shutil.which("torchrun") is None or not torch.distributed.is_gloo_available():
        pytest.skip("torchrun with the gloo backend is not available")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_all_ranks_pick_the_same_plan(ranks):
    assert ranks[0]["world_size"] == 2
    for name in ("fisher", "taylor", "activation", "fluctuation"):
        assert ranks[0][name]["plan"] == ranks[1][name]["plan"]
        assert ranks[0][name]["scores"] == ranks[1][name]["scores"]


def test_reduced_scores_equal_one_process_on_all_batches(ranks):
    sys.path.insert(0, str(SCRIPT.parent))
    import score_distributed

    reference = score_distributed.run(*score_distributed.build())
    for name in score_distributed.CRITERIA:
        got, want = ranks[0][name], reference[name]
        assert got["scores"].keys() == want["scores"].keys()
        for key in want["scores"]:
            assert torch.allclose(torch.tensor(got["scores"][key]), torch.tensor(want["scores"][key]),
                                  rtol=1e-4, atol=1e-9), (name, key)
        assert got["plan"] == want["plan"], name
    assert ranks[0]["bias"] == ranks[1]["bias"] and ranks[0]["bias"].keys() == reference["bias"].keys()
    for key, delta in reference["bias"].items():  # compensation biases from the means over every rank's batches
        assert torch.allclose(torch.tensor(ranks[0]["bias"][key]), torch.tensor(delta), rtol=1e-5, atol=1e-7), key
    for key, block in reference["fisher"]["blocks"].items():
        assert torch.allclose(torch.tensor(ranks[1]["fisher"]["blocks"][key]), torch.tensor(block),
                              rtol=1e-4, atol=1e-9)


def test_obs_reconstruction_uses_every_ranks_batches(ranks):
    sys.path.insert(0, str(SCRIPT.parent))
    import score_distributed

    reference = score_distributed.run(*score_distributed.build())["obs"]
    assert ranks[0]["obs"].keys() == reference.keys() and len(reference) == 6  # 3 layers x (attention, FFN)
    for key, want in reference.items():
        for rank in ranks:
            assert rank["obs"][key]["kept"] == want["kept"], key
            assert torch.allclose(torch.tensor(rank["obs"][key]["weight"]), torch.tensor(want["weight"]),
                                  rtol=1e-4, atol=1e-6), key

"""Every script in examples/ runs to the end, offline, and prints what it promises.

Each runs in its own process (one thread, no Hub). Scripts that read the offline assets are marked slow and
skip with a reason when the assets are not installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfprune.data.assets import AssetMissing, cache_dir, minilm_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def minilm() -> Path:
    try:
        return minilm_dir()
    except AssetMissing as err:
        pytest.skip(f"real MiniLM asset not installed: {err}")


def test_every_example_is_tested():
    tested = {"apply_plan.py", "oneshot_prune.py", "trainer_callback.py", "prune_llm.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_apply_plan_tiny():
    out = run_example("apply_plan.py")
    assert "outputs identical" in out
    assert "layers[2]" in out and "layers[3]" not in out  # the last of 4 layers is dropped


def test_trainer_callback():
    out = run_example("trainer_callback.py", "--steps", "20")
    assert "outputs identical" in out
    before, after = (int(v.replace(",", "")) for v in out.split("MACs ")[-1].split("\n")[0].split(" -> "))
    assert after <= 0.5 * before


def test_prune_llm_plain_checkpoint():
    out = run_example("prune_llm.py")
    assert "config: 2 heads, 1 KV heads" in out  # one of two key/value groups kept in every layer
    assert "plain checkpoint: True; reloaded greedy tokens identical" in out


@pytest.mark.slow
def test_apply_plan_on_real_minilm():
    out = run_example("apply_plan.py", "--model-dir", str(minilm()))
    assert "outputs identical" in out
    assert "layers[4]" in out and "layers[5]" not in out


@pytest.mark.slow
def test_oneshot_prune_real_minilm():
    minilm()
    if not (cache_dir() / "vader" / "movieReviewSnippets_GroundTruth.txt").is_file():
        pytest.skip("movie-review sentences not installed: run `bash benchmarks/install_assets.sh`")
    out = run_example("oneshot_prune.py", "--examples", "64")
    macs = next(line for line in out.splitlines() if line.startswith("MACs"))
    assert float(macs.split()[-1]) <= 0.6
    assert "recovery: rearrange" in out and "layers[5]" in out

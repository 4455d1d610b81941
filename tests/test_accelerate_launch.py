"""``accelerate launch -m hfprune run RECIPE`` with two processes (gloo on CPU), as the README documents it.

Every process runs the recipe; only rank 0 writes the checkpoint. A one-shot recipe gives the checkpoint a single
process gives (no process group is set up: each rank scores all the calibration batches itself). A gradual recipe
trains under DDP (the Trainer sets up gloo): the ranks agree on the plan (scores are summed across ranks) and the
checkpoint reloads. It is not the single-process result of the same recipe: each rank trains on its own 8 rows (a
global batch of 16, not 8), and both ranks, seeded alike, draw the same dropout masks, which one process on the 16
rows does not. Without dropout and with one process given the same 16 rows per step, the plans agree; with
sequential sampling and no token averaging across devices the weights agree too, to float rounding.
On CPU, ``--multi_gpu --num_processes 2`` is what starts two processes (``--cpu`` starts one). The data loader
(tests/scripts/accel_spy.py) records each process's plan and every call of ``save_run``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from tests.test_cli import make_tiny_model

ROOT = Path(__file__).parent.parent
LOADER = "tests.scripts.accel_spy:text_rows"
TRAINING = {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "use_cpu": True,
            "logging_steps": 2, "disable_tqdm": True}

pytestmark = pytest.mark.slow  # five recipe runs in subprocesses (three with 2 processes): ~45 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch() -> list:
    port = str(free_port())
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", port]


def write_recipe(root: Path, model: Path, name: str, method: str) -> Path:
    recipe = {
        "name": name, "method": method, "seed": 0,
        "model": {"path": str(model), "task": "text-classification"},
        "data": {"loader": LOADER, "kwargs": {"spy": str(root / "spy")}, "max_length": 16,
                 "calibration_samples": 16, "calibration_batch_size": 8},
        "pruning": {"criterion": "fisher", "macs_ratio": 0.5},
        "evaluation": {"metrics": ["accuracy"], "batch_size": 16, "latency": False},
        "output": {"dir": str(root / "out"), "plots": False},
    }
    if method == "gradual":
        recipe.update(training=TRAINING, schedule={"kind": "gradual", "start_step": 0, "end_step": 4, "every": 2})
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def hfprune_run(launcher: list, recipe: Path, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launch
        env.pop(key, None)
    proc = subprocess.run(launcher + ["-m", "hfprune", "run", str(recipe), *overrides], env=env, cwd=recipe.parent,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def spied(root: Path) -> tuple:
    plans = {int(p.name[len("plan-rank"):-len(".json")]): json.loads(p.read_text())
             for p in (root / "spy").glob("plan-rank*.json")}
    saves = [json.loads(line) for line in (root / "spy" / "saves.jsonl").read_text().splitlines()]
    return plans, saves


def check_written_once(root: Path, stdout: str, processes: int) -> None:
    """One checkpoint, written by rank 0 alone, complete and with no staging or scratch left behind."""
    plans, saves = spied(root)
    assert sorted(plans) == list(range(processes))
    assert {p["world_size"] for p in plans.values()} == {processes}
    assert len({p["pid"] for p in plans.values()}) == processes
    assert [s["rank"] for s in saves] == [0] and saves[0]["pid"] == plans[0]["pid"]
    assert stdout.count("Saved to ") == 1 and stdout.count("| parameters |") == processes  # every rank ran
    out = root / "out"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert not [n for n in names if n.startswith(".")], names  # no .hfprune-staging-*, no commit marker
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no .out.trainer scratch
    for name in ("config.json", "model.safetensors", "modeling_hfprune.py", "prune_plan.json", "README.md",
                 "recipe.yaml", "hfprune_results.json", "tokenizer.json"):
        assert name in names, name


def reload(out: Path):
    return T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()


def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 46, (4, 10), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def comparable(results: dict) -> dict:
    """The results but what differs between two runs of the same recipe (time, the folder it was loaded from)."""
    return {k: v for k, v in results.items() if k not in ("seconds", "base_model_dir")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("accel-model"))


def test_oneshot_two_processes_write_once_and_match_one_process(tiny_model, tmp_path):
    two = write_recipe(tmp_path / "two", tiny_model, "tiny-oneshot", "oneshot")
    one = write_recipe(tmp_path / "one", tiny_model, "tiny-oneshot", "oneshot")
    check_written_once(tmp_path / "two", hfprune_run(accelerate_launch(), two), processes=2)
    check_written_once(tmp_path / "one", hfprune_run([sys.executable], one), processes=1)

    plans2, _ = spied(tmp_path / "two")
    plans1, _ = spied(tmp_path / "one")
    assert {p["process_group"] for p in [*plans2.values(), *plans1.values()]} == {None}  # no DDP in a one-shot run
    assert plans2[0]["plan"] == plans2[1]["plan"] == plans1[0]["plan"]
    out2, out1 = tmp_path / "two" / "out", tmp_path / "one" / "out"
    plan = json.loads((out2 / "prune_plan.json").read_text())
    assert plan == json.loads((out1 / "prune_plan.json").read_text())
    assert any(layer.get("heads") is not None or layer.get("ffn") is not None for layer in plan["layers"])
    w2, w1 = weights(out2), weights(out1)
    assert w2.keys() == w1.keys() and all(torch.equal(w2[k], w1[k]) for k in w1)  # bit for bit
    r2, r1 = (json.loads((o / "hfprune_results.json").read_text()) for o in (out2, out1))
    assert comparable(r2) == comparable(r1)
    assert r2["macs"]["after"] <= 0.5 * r2["macs"]["before"]
    model2, model1 = reload(out2), reload(out1)
    assert sum(p.numel() for p in model2.parameters()) == r2["params"]["after"]
    assert torch.equal(logits(model2), logits(model1))


def test_gradual_two_processes_agree_on_the_plan_and_write_once(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "two", tiny_model, "tiny-gradual", "gradual")
    check_written_once(tmp_path / "two", hfprune_run(accelerate_launch(), recipe), processes=2)
    plans, _ = spied(tmp_path / "two")
    assert plans[0]["plan"] == plans[1]["plan"]  # the ranks pruned the same structures
    out = tmp_path / "two" / "out"
    assert {p["process_group"] for p in plans.values()} == {2}  # the Trainer trained under DDP (gloo)
    saved = json.loads((out / "prune_plan.json").read_text())
    assert {k: v for k, v in saved.items() if k != "hfprune_version"} == plans[0]["plan"]
    results = json.loads((out / "hfprune_results.json").read_text())
    assert results["macs"]["after"] <= 0.5 * results["macs"]["before"]
    model = reload(out)
    assert sum(p.numel() for p in model.parameters()) == results["params"]["after"]
    assert torch.isfinite(logits(model)).all()


@pytest.fixture(scope="module")
def tiny_model_no_dropout(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accel-model-nodrop") / "model"
    model = T.AutoModelForSequenceClassification.from_pretrained(tiny_model, hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0)
    model.save_pretrained(root)
    T.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root)
    return root


def test_gradual_two_processes_match_one_process_on_the_same_global_batch(tiny_model_no_dropout, tmp_path):
    """2 x 8 rows per step against 1 x 16, in order, without dropout: the same plan and (to float rounding: the
    gradient reduction adds in another order) the same weights."""
    same = ["--training.train_sampling_strategy=sequential", "--training.average_tokens_across_devices=false"]
    two = write_recipe(tmp_path / "two", tiny_model_no_dropout, "tiny-gradual", "gradual")
    one = write_recipe(tmp_path / "one", tiny_model_no_dropout, "tiny-gradual", "gradual")
    check_written_once(tmp_path / "two", hfprune_run(accelerate_launch(), two, *same), processes=2)
    check_written_once(tmp_path / "one", hfprune_run([sys.executable], one, *same,
                                                     "--training.per_device_train_batch_size=16"), processes=1)
    plans2, _ = spied(tmp_path / "two")
    plans1, _ = spied(tmp_path / "one")
    assert plans2[0]["plan"] == plans2[1]["plan"] == plans1[0]["plan"]
    w2, w1 = weights(tmp_path / "two" / "out"), weights(tmp_path / "one" / "out")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)

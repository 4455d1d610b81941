"""Pruning and distillation under FSDP2 (``fully_shard`` through accelerate), two gloo processes on CPU.

tests/scripts/fsdp2_train.py trains a tiny BERT with ``PruningCallback`` under FSDP2 (its parameters are DTensors,
each rank holding half the rows) and saves with ``trainer.save_model()``; one process without FSDP trains on the
same global batches. Without dropout and with sequential sampling, the plans must be identical on both ranks and
equal to the single-process plan, the losses and the saved, sliced weights equal to float rounding (the gradient
reduction adds in another order), and the checkpoint, written by rank 0 alone, must reload and give the single
process's outputs. accelerate gives FSDP only to GPU-like runs: the script switches the Trainer's accelerator to its
FSDP2 path on CPU (see its docstring); with CUDA it runs unchanged.

DeepSpeed ZeRO-3 is refused before anything changes: with real ZeRO-3 partitioning where deepspeed is installed
(tests/scripts/zero3_refused.py; it is no dependency of the suite), else with the flags faked.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_multiprocess import close, free_port

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_train.py"
ROOT = Path(__file__).parent.parent

slow = pytest.mark.slow  # each case: one 2-process FSDP2 run and one single-process run, ~40 s on 2 cores


def run(launcher: list, out: Path, per_device_batch: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = launcher + [str(SCRIPT), "--out", str(out), "--per-device-batch", str(per_device_batch), "--ga", "2", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def torchrun() -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def two_and_one(tmp_path: Path, *extra: str) -> tuple:
    run(torchrun(), tmp_path / "two", 4, "--fsdp", *extra)  # global batch 2 x 4, accumulated twice
    run([sys.executable], tmp_path / "one", 8, *extra)
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    # it really was FSDP2: the parameters were DTensors holding half of the rows on each rank
    assert r0["fsdp"] and r1["fsdp"] and not one["fsdp"]
    assert r0["param"] == r1["param"] == {"type": "DTensor", "local_rows": one["param"]["local_rows"] // 2}
    assert one["param"]["type"] == "Parameter"
    assert r0["plan"] == r1["plan"] == one["plan"]
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in one["plan"]["layers"])
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert r1["pruned"] is None  # the sliced copy is gathered on rank 0 only
    assert close(r0["pruned"]["sums"], one["pruned"]["sums"], 1e-4)
    return r0, one


def check_saved(tmp_path: Path) -> None:
    """Rank 0 wrote one complete, sliced checkpoint that reloads to the single process's outputs."""
    import transformers as T
    from safetensors.torch import load_file

    two, one = tmp_path / "two" / "saved", tmp_path / "one" / "saved"
    names = sorted(p.name for p in two.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no staging folder left behind
    assert {"config.json", "model.safetensors", "prune_plan.json"} <= set(names)
    w2, w1 = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert w2.keys() == w1.keys()
    for k in w1:
        assert w2[k].shape == w1[k].shape, k
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    auto = T.AutoModelForSequenceClassification
    m2, m1 = (auto.from_pretrained(d, trust_remote_code=True).eval() for d in (two, one))
    plan = json.loads((two / "prune_plan.json").read_text())
    for i, layer in enumerate(plan["layers"]):
        if layer.get("ffn") is not None:
            assert m2.bert.encoder.layer[i].intermediate.dense.out_features == len(layer["ffn"])
    ids = torch.randint(3, 99, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m1(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@slow
def test_fisher_from_gate_gradients_under_fsdp2_matches_one_process(tmp_path):
    two_and_one(tmp_path)
    check_saved(tmp_path)


@slow
def test_distillation_under_fsdp2_matches_one_process(tmp_path):
    """DistillationTrainer with a teacher of another width (learned projections outside the sharded model)."""
    r0, one = two_and_one(tmp_path, "--mode", "distill")
    r1 = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert r0["projection"]["sha256"] == r1["projection"]["sha256"]
    assert close(r0["projection"]["sums"], one["projection"]["sums"], 1e-4)
    check_saved(tmp_path)


@slow
@pytest.mark.parametrize("extra", [("--criterion", "magnitude"), ("--criterion", "activation"),
                                   ("--criterion", "fisher", "--calibration"),
                                   ("--criterion", "fluctuation", "--calibration"), ("--prepruned",)],
                         ids=["magnitude", "activation", "fisher-calibration", "fluctuation-calibration",
                              "second-phase"])
def test_other_score_sources_under_fsdp2_match_one_process(tmp_path, extra):
    """Weights (gathered per matrix), training activations, and calibration batches scored by every rank (with
    gate gradients through a sharded backward, and with activations and gathered weights); and a second pruning
    phase on a model already pruned to other widths per layer (rebuilt from its record, plans composed)."""
    two_and_one(tmp_path, *extra)
    if extra == ("--prepruned",):
        saved = [json.loads((tmp_path / d / "saved" / "prune_plan.json").read_text()) for d in ("two", "one")]
        assert saved[0] == saved[1] and saved[0]["dense"]["layers"][0]["ffn"] == [48]


@slow
def test_llama_with_gqa_and_tied_embeddings_under_fsdp2_matches_ddp(tmp_path):
    """Key/value groups and tied embeddings through the gathered copy. Compared with DDP on the same 2 x 4 rows:
    a causal LM's token-mean loss over 4 rows per rank is not one process's mean over 8 (with the stock Trainer and
    average_tokens_across_devices=False), so DDP, not one process, is the reference here."""
    import transformers as T

    run(torchrun(), tmp_path / "fsdp", 4, "--fsdp", "--model", "llama")
    run(torchrun(), tmp_path / "ddp", 4, "--model", "llama")
    f0, f1, d0 = (json.loads((tmp_path / d / f"rank{r}.json").read_text()) for d, r in (("fsdp", 0), ("fsdp", 1),
                                                                                          ("ddp", 0)))
    assert f0["param"]["type"] == "DTensor" and d0["param"]["type"] == "Parameter"
    assert f0["plan"] == f1["plan"] == d0["plan"]
    assert any(e.get("heads") is not None for e in d0["plan"]["layers"])
    assert f0["losses"] == pytest.approx(d0["losses"], rel=1e-5)
    assert close(f0["pruned"]["sums"], d0["pruned"]["sums"], 1e-4)
    a, b = (T.AutoModelForCausalLM.from_pretrained(tmp_path / d / "saved", trust_remote_code=True).eval()
            for d in ("fsdp", "ddp"))
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


def test_calibration_of_unequal_length_across_ranks_fails_on_every_rank_rather_than_hanging(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = torchrun() + [str(SCRIPT), "--out", str(tmp_path), "--fsdp", "--calibration", "--uneven"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("every rank must score the same number of calibration batches") >= 2, proc.stderr[-3000:]
    assert not list(tmp_path.glob("rank*.json"))


FAKE_RANK = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from hfprune.core.sharded import fill_slices_, is_sharded, local_range
    full = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    mesh = init_device_mesh("cpu", (2,))
    # rank 1 of 2 holds rows 3 and 4 (torch.chunk: 3 + 2, as FSDP2 shards an uneven dimension)
    p = torch.nn.Parameter(DTensor.from_local(full[3:].clone(), mesh, [Shard(0)], run_check=False,
                                              shape=full.shape, stride=full.stride()))
    assert local_range(p, 0) == (3, 2) and local_range(p, 1) == (0, 3)
    fill_slices_([(p, 0, torch.tensor([0, 4])), (p, 1, torch.tensor([1]))])
    assert p.to_local().tolist() == [[9.0, 0.0, 11.0], [0.0, 0.0, 0.0]], p.to_local()
    linear = torch.nn.Linear(3, 5)
    assert not is_sharded(linear)
    linear.weight = p
    assert is_sharded(linear)
    print("ok")
""")


def test_masked_rows_and_columns_are_zeroed_in_the_local_shard_of_an_uneven_split():
    proc = subprocess.run([sys.executable, "-c", FAKE_RANK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


FAKE_SHARDED = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState
    from hfprune import PruningConfig
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig
    from tests.scripts.mp_train import tiny_bert, toy_data
    model = tiny_bert(0)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    rows = toy_data(4)
    batch = [{k: torch.stack([torch.as_tensor(e[k]) for e in rows]) for k in ("input_ids", "attention_mask", "labels")}]
    state = TrainerState()
    state.max_steps = 8
    cases = {"taylor": (PruningConfig(criterion="taylor", macs_ratio=0.5), batch),
             "latency_ratio": (PruningConfig(criterion="magnitude", latency_ratio=0.5), None)}
    for words, (config, calibration) in cases.items():
        cb = PruningCallback(config, ScheduleConfig(kind="gradual", start_step=2, end_step=4, every=2),
                             calibration=calibration)
        try:
            cb.on_train_begin(type("Args", (), {})(), state, TrainerControl(), model=model)
        except ValueError as err:
            assert words in str(err) and "FSDP2" in str(err) and cb.masks is None, err
            print("refused", words)
""")


def test_what_fsdp2_cannot_do_is_refused_before_the_first_step():
    """latency_ratio and taylor on calibration data, on a model sharded with fully_shard (a fake 2-rank group)."""
    proc = subprocess.run([sys.executable, "-c", FAKE_SHARDED], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused taylor" in proc.stdout and "refused latency_ratio" in proc.stdout, proc.stdout


# -- DeepSpeed ZeRO-3: refused before anything changes ---------------------------------------------------------------


def _tiny():
    from tests.scripts.mp_train import tiny_bert

    return tiny_bert(0)


class _FakeZero3Config:
    def is_zero3(self):
        return True


class _Args:
    hf_deepspeed_config = _FakeZero3Config()


def _on_train_begin(callback, model, args):
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.max_steps = 10
    return callback.on_train_begin(args, state, TrainerControl(), model=model)


@pytest.mark.parametrize("how", ["args", "partitioned-parameters", "accelerate-env"])
def test_deepspeed_zero3_is_refused_naming_what_is_supported(how, monkeypatch):
    from hfprune import PruningConfig
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig

    model = _tiny()
    args = type("Args", (), {})()
    if how == "args":  # TrainingArguments(deepspeed=<ZeRO-3 config>) sets args.hf_deepspeed_config
        args = _Args()
    elif how == "partitioned-parameters":  # what ZeRO-3's partitioning leaves on every parameter
        for i, p in enumerate(model.parameters()):
            p.ds_id = i
    else:  # accelerate launch with a ZeRO-3 DeepSpeed config
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    callback = PruningCallback(PruningConfig(criterion="magnitude", macs_ratio=0.5),
                               ScheduleConfig(kind="oneshot", start_step=0))
    with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-3.*Supported: .*DDP.*FSDP2"):
        _on_train_begin(callback, model, args)
    assert callback.masks is None  # nothing attached, nothing pruned
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deepspeed_zero2_and_no_deepspeed_pass_the_check(monkeypatch):
    from hfprune.core.sharded import check_supported_sharding

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_supported_sharding(_tiny(), type("Args", (), {})())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_supported_sharding(_tiny(), None)


def test_real_deepspeed_zero3_partitioning_is_refused_on_every_rank():
    """With deepspeed installed (it installs and runs ZeRO-3 on CPU with gloo; not a dependency of the suite)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(torchrun() + [str(SCRIPT.parent / "zero3_refused.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refused 0" in proc.stdout and "refused 1" in proc.stdout


def test_distillation_trainer_refuses_deepspeed_zero3(tmp_path):
    """A teacher copied from ZeRO-3-partitioned weights would be empty: refused (partitioning faked here)."""
    from transformers import TrainingArguments

    from hfprune.distill import DistillationTrainer

    model = _tiny()
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO-3"):
        DistillationTrainer(model=model, args=TrainingArguments(str(tmp_path / "out"), report_to=[], use_cpu=True))


RESUME = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, sys.argv[3])
    import torch
    from transformers import Trainer, TrainingArguments
    from hfprune import PruningConfig
    from hfprune.pruning.callback import PruningCallback
    from hfprune.pruning.schedule import ScheduleConfig
    from tests.scripts.fsdp2_train import force_fsdp2
    from tests.scripts.mp_train import summary, tiny_bert, toy_data

    out, resume = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    callback = PruningCallback(PruningConfig(criterion="fisher", macs_ratio=0.5),
                               ScheduleConfig(kind="gradual", start_step=2, end_step=4, every=2))
    args = TrainingArguments(
        os.path.join(out, "run"), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps", save_steps=3,
        disable_tqdm=True, train_sampling_strategy="sequential", seed=0, ddp_find_unused_parameters=False,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"],
                                "state_dict_type": "SHARDED_STATE_DICT"})
    trainer = Trainer(model=tiny_bert(0), args=args, train_dataset=toy_data(64), callbacks=[callback])
    force_fsdp2(trainer)
    if resume != "-":
        callback.load_state(resume)  # the checkpoint is another run's: its pruning state is named here
    trainer.train(resume_from_checkpoint=None if resume == "-" else resume)
    result = {"plan": callback.plan.to_dict(), "events": list(callback.events_done),
              "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
              "pruned": summary(callback.pruned_model) if callback.pruned_model is not None else None}
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
''')


@slow
def test_fsdp2_training_resumes_from_a_checkpoint_to_the_same_plan(tmp_path):
    """Train under FSDP2 with PruningCallback, checkpointing at step 3 (between the two pruning steps, 2 and 4);
    a second 2-process run resumes from that checkpoint (sharded model and optimizer state, the callback's JSON
    state) and must end with the same plan, the same losses after the resume and the same sliced weights.

    The checkpoints are sharded (``state_dict_type: SHARDED_STATE_DICT``, torch.distributed.checkpoint files per
    rank). With the default FULL_STATE_DICT the Trainer's own checkpoint at step 3 fails on CPU gloo with or without
    hfprune (checked with no callback at all): ``save_pretrained`` of the state dict accelerate gathered raises
    ``RuntimeError: Attempted to access the data pointer on an invalid python storage`` in safetensors'
    ``_find_shared_tensors``."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for out, resume in ((tmp_path / "full", "-"), (tmp_path / "resumed", str(tmp_path / "full" / "run" /
                                                                                "checkpoint-3"))):
        proc = subprocess.run(torchrun() + [str(script), str(out), resume, str(ROOT)], env=env,
                              capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    full, resumed = ({r: json.loads((tmp_path / d / f"rank{r}.json").read_text()) for r in (0, 1)}
                     for d in ("full", "resumed"))
    assert full[0]["plan"] == full[1]["plan"] == resumed[0]["plan"] == resumed[1]["plan"]
    assert any(e.get("heads") is not None or e.get("ffn") is not None for e in full[0]["plan"]["layers"])
    assert resumed[0]["events"] == full[0]["events"]
    after = {s: v for s, v in full[0]["losses"].items() if int(s) > 3}
    assert after and resumed[0]["losses"].keys() >= after.keys()
    assert [resumed[0]["losses"][s] for s in after] == pytest.approx(list(after.values()), rel=1e-4)
    assert close(resumed[0]["pruned"]["sums"], full[0]["pruned"]["sums"], 1e-4)
    assert resumed[1]["pruned"] is None  # the sliced copy is gathered on rank 0 only

# Copyright hfprune contributors. Apache-2.0.
"""Prune and distil time-series transformers on vic_elec (half-hourly demand and temperature), on the CPU.

For PatchTST and TimeSeriesTransformer (context 336 = one week, horizon 48 = one day):
train a dense teacher (cached under ``hfprune.data.assets.cache_dir()/teachers``), compare it with seasonal-naive
forecasts, prune 50% of the heads (TimeSeriesTransformer: encoder self-, decoder self- and cross-attention) and
50% of the FFN neurons with Fisher scores on the forecasting loss, report that retraining-free model, then
distil it from the teacher and report test MSE/MAE/MASE and the measured CPU speedup at batch 64.

    flock /tmp/hfprune-bench.lock python benchmarks/timeseries_vic_elec.py           # full run, writes the table
    flock /tmp/hfprune-bench.lock python benchmarks/timeseries_vic_elec.py --quick   # smoke run, writes nothing
    ... --rebuild   # retrain the cached teachers
    ... --latency-only   # PatchTST dense vs pruned latency only, more rounds (timeseries_vic_elec_latency.md)

Metrics are on the standardised scale (each channel scaled with train-span statistics), averaged over both
channels and the test windows (stride 48: every test step is forecast once); MASE divides by the in-window
seasonal-naive (48 steps, one day) MAE of each window's own past.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import hfprune  # noqa: E402
from hfprune import metrics  # noqa: E402
from hfprune.data.timeseries import (  # noqa: E402
    VIC_ELEC,
    VIC_ELEC_TEACHERS,
    ForecastCollator,
    forecast_training_args,
    train_vic_elec_teacher,
    vic_elec_teacher,
    vic_elec_windows,
)
from hfprune.distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hfprune.forecast import (  # noqa: E402
    channel_series,
    distribution_kind,
    greedy_forecast,
    point_forecast,
    seasonal_naive,
)
from hfprune.pruning.latency import cpu_name  # noqa: E402

CONTEXT, HORIZON = VIC_ELEC["context_length"], VIC_ELEC["prediction_length"]
SEASON, SEED = 48, 0
BUDGET = {"head_ratio": 0.5, "ffn_ratio": 0.5}
DISTILL = {"patchtst": {"steps": 1500, "lr": 5e-4, "batch": 32, "alpha": 0.5},
           "time_series_transformer": {"steps": 1000, "lr": 5e-4, "batch": 32, "alpha": 0.5}}
CALIBRATION = {"samples": 256, "batch": 32}
LATENCY = {"batch": 64, "rounds": {"patchtst": 9, "time_series_transformer": 9}, "warmup": 1}


# ---- training -------------------------------------------------------------------------------------------------

def teacher(name: str, data, quick: bool, rebuild: bool) -> tuple:
    """The cached dense teacher (``hfprune.data.timeseries.vic_elec_teacher``); a 20-step one for --quick."""
    if quick:
        return train_vic_elec_teacher(name, data, steps=20)
    path = vic_elec_teacher(name, rebuild=rebuild)
    model_cls = T.PatchTSTForPrediction if name == "patchtst" else T.TimeSeriesTransformerForPrediction
    return model_cls.from_pretrained(path).eval(), json.loads((path / "teacher.json").read_text())


def distill(student, teacher_model, data, s: dict, quick: bool) -> float:
    s = dict(s, steps=10 if quick else s["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        args = forecast_training_args(tmp, s["steps"], s["lr"], s["batch"], SEED)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data["train"],
                                      data_collator=ForecastCollator(student.config), teacher=teacher_model,
                                      distill_config=DistillationConfig(alpha=s["alpha"]))
        start = time.perf_counter()
        trainer.train()
    student.eval()
    return time.perf_counter() - start


# ---- evaluation -----------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict(model, split, limit: int | None = None) -> np.ndarray:
    """Point forecasts (N, H, C) on ``split``: the forecast of point heads, the greedy mean path of seq2seq."""
    model.eval()
    seq2seq = model.config.model_type != "patchtst"
    collate = ForecastCollator(model.config, future=False)
    rows = split if limit is None else split.select(range(min(limit, len(split))))
    preds = []
    for batch in DataLoader(rows, batch_size=64, collate_fn=collate):
        if seq2seq:
            preds.append(greedy_forecast(model, batch, distribution_kind(model)))
        else:
            preds.append(point_forecast(model(**batch)))
    return torch.cat(preds).numpy()


METRICS = {name: metrics.load(name) for name in ("mse", "mae", "mase")}


def scores(pred: np.ndarray, target: np.ndarray, past: np.ndarray) -> dict:
    """MSE, MAE and MASE (seasonal period 48, scaled per window and channel by its own past)."""
    p, r, h = (channel_series(torch.from_numpy(np.asarray(a))).numpy() for a in (pred, target, past))
    return {"mse": METRICS["mse"].compute(predictions=p.tolist(), references=r.tolist())["mse"],
            "mae": METRICS["mae"].compute(predictions=p.tolist(), references=r.tolist())["mae"],
            "mase": METRICS["mase"].compute(predictions=p.tolist(), references=r.tolist(), training=h.tolist(),
                                            periodicity=SEASON)["mase"]}


def latency(fns: dict, rounds: int, warmup: int) -> dict:
    """Median seconds per call of each function; the functions alternate within every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def call(model, batch):
    seq2seq = model.config.model_type != "patchtst"

    def run():
        with torch.inference_mode():
            return greedy_forecast(model, batch) if seq2seq else model(**batch)

    return run


# ---- the benchmark --------------------------------------------------------------------------------------------

def calibration_batches(model, split) -> list:
    collate = ForecastCollator(model.config)
    rows = split.shuffle(seed=SEED).select(range(CALIBRATION["samples"]))
    return list(DataLoader(rows, batch_size=CALIBRATION["batch"], collate_fn=collate))


def run_model(name: str, data, quick: bool, rebuild: bool) -> list:
    test = data["test"]
    limit = 64 if quick else None
    target = np.asarray(test["future_values"][: limit or len(test)])
    past = np.asarray(test["past_values"][: limit or len(test)])[:, -CONTEXT:]
    rows = []

    def add(label, pred, params=None, seconds=None, note=""):
        rows.append({"model": name, "variant": label, **scores(pred, target, past), "params": params,
                     "latency_s": seconds, "note": note})
        print(f"  {name} {label}: {rows[-1]}", flush=True)

    if name == "patchtst":  # baselines need no model; report them once
        add("seasonal naive, period 48 (1 day)", seasonal_naive(torch.from_numpy(past), HORIZON, 48).numpy())
        add("seasonal naive, period 336 (1 week)", seasonal_naive(torch.from_numpy(past), HORIZON, 336).numpy())

    dense, record = teacher(name, data, quick, rebuild)
    n_dense = sum(p.numel() for p in dense.parameters())
    dense_pred = predict(dense, test, limit)

    pruned = copy.deepcopy(dense)
    result = hfprune.prune(pruned, calibration_batches(dense, data["train"]),
                           hfprune.PruningConfig(criterion="fisher", **BUDGET))
    n_pruned = sum(p.numel() for p in pruned.parameters())
    oneshot_pred = predict(pruned, test, limit)
    student = copy.deepcopy(pruned)
    distill_s = distill(student.train(), dense, data, DISTILL[name], quick)
    student_pred = predict(student, test, limit)

    batch = ForecastCollator(dense.config, future=False)([test[i] for i in range(LATENCY["batch"])])
    # the retraining-free and the distilled model have the same shapes: both timed, as a check on the timing
    times = latency({"dense": call(dense, batch), "oneshot": call(pruned, batch), "pruned": call(student, batch)},
                    3 if quick else LATENCY["rounds"][name], LATENCY["warmup"])
    macs = f"MACs {result.after.macs / result.before.macs:.2f}x of dense (layers, seq {result.before.seq_len})"
    add("dense teacher", dense_pred, n_dense, times["dense"],
        f"trained {record['train_seconds']:.0f} s, {record['settings']['train']['steps']} steps")
    add("pruned 50% heads + 50% FFN, retraining-free (Fisher)", oneshot_pred, n_pruned, times["oneshot"], macs)
    add("pruned 50% heads + 50% FFN + distilled", student_pred, n_pruned, times["pruned"],
        f"distilled {distill_s:.0f} s, {10 if quick else DISTILL[name]['steps']} steps")
    return rows


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}, transformers {T.__version__}, hfprune {hfprune.__version__}, "
            f"python {platform.python_version()}")


def table(rows: list) -> str:
    out = ["| model | variant | test MSE | test MAE | MASE | MSE vs teacher | params | latency b64 (median) | "
           "speedup | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    teachers = {r["model"]: r for r in rows if r["variant"] == "dense teacher"}
    for r in rows:
        t = teachers.get(r["model"])
        rel = f"{r['mse'] / t['mse'] - 1:+.1%}" if t else ""
        speed = f"{t['latency_s'] / r['latency_s']:.2f}x" if t and r["latency_s"] else ""
        lat = f"{r['latency_s'] * 1000:.0f} ms" if r["latency_s"] else ""
        params = f"{r['params']:,}" if r["params"] else ""
        out.append(f"| {r['model']} | {r['variant']} | {r['mse']:.4f} | {r['mae']:.4f} | {r['mase']:.3f} | {rel} | "
                   f"{params} | {lat} | {speed} | {r['note']} |")
    return "\n".join(out)


def latency_only(data, rounds: int = 31) -> str:
    """PatchTST dense vs pruned (50% heads + 50% FFN, Fisher; the shapes every pruned row above has) at batch 64,
    timed over more interleaved rounds than the full run: a second look at the speedup on a loaded machine."""
    dense, _ = teacher("patchtst", data, False, False)
    pruned = copy.deepcopy(dense)
    hfprune.prune(pruned, calibration_batches(dense, data["train"]), hfprune.PruningConfig(criterion="fisher",
                                                                                         **BUDGET))
    batch = ForecastCollator(dense.config, future=False)([data["test"][i] for i in range(LATENCY["batch"])])
    times = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        times[name] = call(model, batch)
    med = latency(times, rounds, warmup=3)
    load = os.getloadavg()
    return "\n".join([
        "# PatchTST on vic_elec: latency only (dense vs 50% heads + 50% FFN)", "",
        "Command: `flock /tmp/hfprune-bench.lock python benchmarks/timeseries_vic_elec.py --latency-only`", "",
        f"Machine: {machine()}; load average at the end {load[0]:.2f} (1 min).", "",
        f"| model | median of {rounds} rounds, batch {LATENCY['batch']} | speedup |", "|---|---:|---:|",
        f"| dense | {1000 * med['dense']:.1f} ms | 1.00x |",
        f"| pruned | {1000 * med['pruned']:.1f} ms | {med['dense'] / med['pruned']:.2f}x |", ""])


def main(argv: list) -> None:
    quick, rebuild = "--quick" in argv, "--rebuild" in argv
    if "--latency-only" in argv:
        text = latency_only(vic_elec_windows(**VIC_ELEC))
        print(text)
        path = Path(__file__).resolve().parent / "results" / "timeseries_vic_elec_latency.md"
        path.write_text(text)
        return
    torch.manual_seed(SEED)
    start = time.perf_counter()
    data = vic_elec_windows(**VIC_ELEC)
    if quick:
        data["train"] = data["train"].select(range(2048))
    rows = []
    for name in VIC_ELEC_TEACHERS:
        print(f"== {name}", flush=True)
        rows.extend(run_model(name, data, quick, rebuild))
    md = table(rows)
    command = "flock /tmp/hfprune-bench.lock python benchmarks/timeseries_vic_elec.py " + " ".join(argv)
    text = "\n".join([
        "# Time-series transformers on vic_elec: prune 50% heads + 50% FFN, distil", "",
        f"Command: `{command.strip()}` (total {time.perf_counter() - start:.0f} s).", "",
        f"Machine: {machine()}.", "",
        f"Data: vic_elec (Demand, Temperature; half-hourly, 52,608 steps), context {CONTEXT}, horizon {HORIZON}; "
        f"split by time 70/10/20, windows of val/test forecast only after the previous span ends; per-channel "
        f"scaling fitted on train; test windows {len(data['test'])} (stride {VIC_ELEC['strides']['test']}). "
        "Metrics on the standardised scale, via hfprune.metrics evaluate modules; MASE against the in-window "
        f"seasonal naive (period {SEASON}).", "",
        "TimeSeriesTransformer forecasts are the StudentT means of `hfprune.forecast.greedy_forecast`; its only "
        "lag is 48 steps (one day, the horizon), so no horizon step reads another and one encoder-decoder pass "
        "gives the whole forecast, exactly the inputs teacher-forced training saw (with lags 1-7 the model "
        "learnt to copy the previous step and its 48-step greedy path drifted below seasonal naive). "
        "Latency is one forecast (one forward) at batch 64 for both models. "
        "Latency: dense, retraining-free and "
        "distilled models (the last two of the same shapes, timed separately) alternate within each round, median "
        f"of {LATENCY['rounds']} rounds after {LATENCY['warmup']} warm-up call.", "",
        "Distillation: `hfprune.distill.DistillationTrainer` (DistillationConfig(alpha=0.5)); loss = alpha * "
        "`hfprune.forecast.forecast_distill_loss` + (1 - alpha) * the student's forecasting loss; PatchTST: MSE "
        "to the teacher's forecast, TimeSeriesTransformer: KL(teacher || student) of the StudentT heads, Monte "
        "Carlo over 16 teacher samples.", "",
        md, ""])
    print(md)
    if not quick:
        path = Path(__file__).resolve().parent / "results" / "timeseries_vic_elec.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""A recipe data loader for tests/test_accelerate_launch.py that also records what each process does.

``hfprune run`` calls it (``data.loader: tests.scripts.accel_spy:text_rows``) in every process that
``accelerate launch`` starts. Besides returning a tiny text-classification DatasetDict (the words ``good``/``bad``
carry the label, as in tests/test_cli.py), it wraps two names of :mod:`hfprune.pipeline.run` in this process only:

- ``layer_rows``, which every process calls with the plan it pruned to: each process writes
  ``SPY/plan-rank<RANK>.json`` (its rank, world size, pid, the size of its torch.distributed process group or
  ``None`` without one, and the plan);
- ``save_run``, which only the writing process must call: each call appends a line to ``SPY/saves.jsonl``.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(40)]


def _rows(n: int, rng: random.Random) -> dict:
    text, label = [], []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = rng.sample(WORDS, 5) + ["good" if y else "bad"]
        rng.shuffle(words)
        text.append(" ".join(words))
        label.append(y)
    return {"text": text, "label": label}


def _identity() -> dict:
    import torch.distributed as dist

    group = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    return {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "process_group": group, "pid": os.getpid()}


def install(spy: Path) -> None:
    import hfprune.pipeline.run as run

    if getattr(run.layer_rows, "_spied", False):
        return
    spy.mkdir(parents=True, exist_ok=True)
    layer_rows, save_run = run.layer_rows, run.save_run

    @functools.wraps(layer_rows)
    def spied_layer_rows(before, after, plan):
        me = _identity()
        (spy / f"plan-rank{me['rank']}.json").write_text(json.dumps({**me, "plan": plan.to_dict()}, sort_keys=True))
        return layer_rows(before, after, plan)

    @functools.wraps(save_run)
    def spied_save_run(*args, **kwargs):
        with open(spy / "saves.jsonl", "a") as f:
            f.write(json.dumps(_identity()) + "\n")
        return save_run(*args, **kwargs)

    spied_layer_rows._spied = True
    run.layer_rows, run.save_run = spied_layer_rows, spied_save_run


def text_rows(seed: int = 0, spy: str | None = None):
    import datasets

    if spy is not None:
        install(Path(spy))
    rng = random.Random(0)  # the data is fixed; the recipe's seed shuffles calibration and training only
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(_rows(n, rng))
                                 for split, n in (("train", 64), ("validation", 16), ("test", 24))})

"""One rank of the 2-process scoring test (tests/test_importance_distributed.py); run with torchrun.

    torchrun --nproc_per_node 2 tests/scripts/score_distributed.py OUT_DIR

Each rank scores its own share of the calibration batches of a tiny BERT, selects a plan and writes
``OUT_DIR/rank<r>.json`` with the reduced scores and the plan.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.cases

CRITERIA = ("fisher", "taylor", "activation", "fluctuation")
N_BATCHES = 4


def build():
    from tests.cases import CASES

    torch.manual_seed(0)
    case = CASES["bert"]
    return case.build("eager").eval(), [case.inputs(s) for s in range(N_BATCHES)]


def run(model, batches) -> dict:
    from hfprune import PruningConfig
    from hfprune.pruning.importance import get_importance
    from hfprune.pruning.oneshot import plan_from_scores

    out = {}
    for name in CRITERIA:
        criterion = get_importance(name, **({"keep_blocks": True} if name == "fisher" else {}))
        scores = criterion.score(model, batches)
        plan = plan_from_scores(model, scores, PruningConfig(criterion=name, macs_ratio=0.5, seq_len=8,
                                                             recovery="none"))
        out[name] = {"scores": {"/".join(map(str, k)): v.tolist() for k, v in sorted(scores.items())},
                     "plan": plan.to_dict()}
        if name == "fisher":
            out[name]["blocks"] = {"/".join(map(str, k)): v.tolist() for k, v in sorted(criterion.blocks.items())}
    # bias compensation: the calibration means (and so the folded biases) must be those of all ranks' batches
    import copy

    from hfprune.pruning.recovery import compensate_biases, tunable_blocks

    kept = {key: list(range(0, module.in_features // width, 2)) for key, module, width in tunable_blocks(model)}
    deltas = compensate_biases(copy.deepcopy(model), kept, batches)
    out["bias"] = {"/".join(map(str, k)): v.tolist() for k, v in sorted(deltas.items())}
    # structured OBS: the input Hessians (and so the picks and the updated weights) must be those of all batches
    from hfprune.pruning.obs import reconstruct

    tuned = copy.deepcopy(model)
    picked = reconstruct(tuned, kept, batches)
    modules = {key: module for key, module, _ in tunable_blocks(tuned)}
    out["obs"] = {"/".join(map(str, k)): {"kept": list(v), "weight": modules[k].weight.tolist()}
                  for k, v in sorted(picked.items())}
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = build()
    result = run(model, batches[rank::world])  # each rank sees different batches
    result["world_size"] = world
    path = Path(out_dir) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result))
    os.replace(path.with_suffix(".tmp"), path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

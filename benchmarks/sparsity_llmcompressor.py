"""llm-compressor's Wanda and SparseGPT modifiers on SmolLM2-135M, as the peer of ``sparsity_smollm2.py``: same
model, calibration blocks and test blocks. Runs in its own environment (llm-compressor pins transformers 5.17):

    python -m venv --system-site-packages /work/venvs/llmc && /work/venvs/llmc/bin/pip install llmcompressor
    flock /tmp/hfprune-bench.lock /work/venvs/llmc/bin/python benchmarks/sparsity_llmcompressor.py

Writes ``benchmarks/results/sparsity_llmcompressor.json``, which ``sparsity_smollm2.py`` puts in its table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # hfprune's data and perplexity code (read only: no hfprune pruning runs here)
sys.path.insert(0, str(ROOT / "benchmarks"))

import datasets  # noqa: E402
import torch  # noqa: E402
from sparsity_common import bbc_blocks, block_sparsity, fingerprint, machine  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hfprune.data.text import smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M copy)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--calibration-block-size", type=int, default=None, help="default: --block-size")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch (results do not depend on it)")
    p.add_argument("--runs", default="sparsegpt:0:0,wanda:0:0,sparsegpt:2:4,wanda:2:4")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/sparsity_llmcompressor.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (perplexity does not depend on them)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()  # seconds below are wall time on a shared machine: the load says how shared
    print("load average at start:", load, flush=True)
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    directory = Path(args.model) if args.model else smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    calibration, test = bbc_blocks(tokenizer, args.block_size, args.calibration_blocks, args.test_blocks,
                                   calibration_block_size=args.calibration_block_size)
    blocks = fingerprint(calibration, test)
    ids = torch.cat([b["input_ids"] for b in calibration])
    calib_ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    classes = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}
    runs = [run.split(":", 1) for run in args.runs.split(",") if run]
    labels = {("50% unstructured" if s == "0:0" else s, f"llm-compressor {n}") for n, s in runs}
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    # rows measured earlier on the same blocks and not re-run now are kept (a later run adds the missing ones)
    rows = [r for r in old.get("rows", []) if old.get("blocks") == blocks
            and (r["pattern"], r["criterion"]) not in labels]
    for name, structure in runs:
        label = "50% unstructured" if structure == "0:0" else structure
        model = copy.deepcopy(dense)
        recipe = classes[name](sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
        start = time.perf_counter()
        oneshot(model=model, dataset=calib_ds, recipe=recipe, num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        ppl = perplexity(model.eval(), test)["perplexity"]
        rows.append({"pattern": label, "criterion": f"llm-compressor {name}", "ppl": ppl, "seconds": seconds,
                     "sparsity": block_sparsity(model)})
        print(rows[-1], flush=True)
        del model
        # after every run: a time limit keeps what is done
        write(args, llmcompressor.__version__, rows, blocks, started, load)


def write(args, version: str, rows: list, blocks: str, started: float, load: tuple) -> None:
    Path(args.out).write_text(json.dumps({"llmcompressor": version, "machine": machine(), "load_at_start": load,
                                          "blocks": blocks, "seconds": time.perf_counter() - started,
                                          "argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

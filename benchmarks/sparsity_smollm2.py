"""SmolLM2-135M on BBC News, retraining-free weight sparsity of the decoder layers' projections: test perplexity of
magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, beside dense and beside llm-compressor's Wanda and
SparseGPT modifiers (same model, calibration and test blocks; run ``sparsity_llmcompressor.py`` first, in its own
environment). Also the on-disk size of the 2:4 SparseGPT model saved with zeros in place and compact, each
reloaded and checked against the in-memory logits.

    flock /tmp/hfprune-bench.lock python benchmarks/sparsity_smollm2.py
    flock /tmp/hfprune-bench.lock python benchmarks/sparsity_smollm2.py --test-blocks 8 --calibration-blocks 8

Writes ``benchmarks/results/sparsity_smollm2.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from sparsity_common import bbc_blocks, block_sparsity, fingerprint, machine  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hfprune  # noqa: E402
from hfprune.data.text import smollm2_dir  # noqa: E402
from hfprune.perplexity import perplexity  # noqa: E402
from hfprune.pruning.sparsity import SparsityConfig  # noqa: E402

PEER = Path(__file__).resolve().parent / "results" / "sparsity_llmcompressor.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M copy)")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--calibration-blocks", type=int, default=32)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--calibration-block-size", type=int, default=None,
                   help="tokens per calibration block (default: --block-size; the BBC calibration split holds "
                        "50,901 tokens: 198 blocks of 256, 99 of 512, 24 of 2048)")
    p.add_argument("--damp", type=float, default=0.01, help="sparsegpt damping, relative to the mean diagonal")
    p.add_argument("--gpt-block", type=int, default=128, help="sparsegpt columns per block")
    p.add_argument("--threads", type=int, default=1, help="torch threads (perplexity does not depend on them)")
    p.add_argument("--criteria", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--extra", default="wanda:owl:0.7,wanda:uniform:0.7",
                   help="more unstructured rows criterion:ratios:sparsity (empty: none)")
    p.add_argument("--out", default="benchmarks/results/sparsity_smollm2.md")
    p.add_argument("--peer-python", default="/work/venvs/llmc/bin/python",
                   help="python of llm-compressor's environment: runs sparsity_llmcompressor.py after hfprune's rows "
                        "on the same blocks (empty, or missing: use an existing sparsity_llmcompressor.json)")
    p.add_argument("--peer-minutes", type=float, default=40.0, help="time limit of the peer run")
    p.add_argument("--peer-runs", default="sparsegpt:0:0,wanda:0:0,sparsegpt:2:4,wanda:2:4")
    p.add_argument("--rows-from", default=None,
                   help="JSON list of rows measured earlier on the same blocks (e.g. by a run stopped half-way): "
                        "kept, and their runs (and a dense row's evaluation) skipped")
    p.add_argument("--render-only", action="store_true",
                   help="only write the markdown from the saved JSON (OUT with .json; an optional \"note\" in it "
                        "is printed under the tables) and the peer's JSON (if measured on the same blocks)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()  # the seconds are wall time on a shared machine: the load says how shared
    if args.render_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        peer = same_blocks_peer(saved.get("blocks"))
        rows = saved["rows"] + (peer["rows"] if peer else [])
        text = render(args, rows, saved["tokens"], saved["disk"], peer, saved.get("seconds", 0), saved.get("argv"),
                      saved.get("machine"), saved.get("load_at_start"), saved.get("note"))
        Path(args.out).write_text(text)
        print(text)
        return
    directory = Path(args.model) if args.model else smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    calibration, test = bbc_blocks(tokenizer, args.block_size, args.calibration_blocks, args.test_blocks,
                                   calibration_block_size=args.calibration_block_size)
    blocks = fingerprint(calibration, test)
    rows = json.loads(Path(args.rows_from).read_text()) if args.rows_from else []
    if isinstance(rows, dict):  # this script's own JSON: its rows count only if measured on the same blocks
        if rows.get("blocks") != blocks:
            raise ValueError(f"--rows-from {args.rows_from}: its rows were measured on blocks {rows.get('blocks')}, "
                             f"this run's are {blocks} (other calibration or test arguments)")
        rows = rows["rows"]
    done = {(r["pattern"], r["criterion"]) for r in rows}
    if ("dense", "-") not in done:
        ppl = perplexity(dense, test)["perplexity"]
        rows.insert(0, {"pattern": "dense", "criterion": "-", "ppl": ppl, "seconds": None, "sparsity": 0.0})
        print(rows[0], flush=True)
    tokens = sum(int(b["attention_mask"].sum()) - len(b["attention_mask"]) for b in test)  # predicted tokens
    runs = [(c, "uniform", pat, None) for pat in args.patterns.split(",") if pat
            for c in args.criteria.split(",") if c]
    runs += [(c, r, "unstructured", float(s)) for c, r, s in (x.split(":") for x in args.extra.split(",") if x)]
    disk = None
    for criterion, ratios, pattern, sparsity in runs:
        label = ("50% unstructured" if pattern == "unstructured" and sparsity is None else
                 f"{sparsity:.0%} unstructured, {ratios}" if sparsity is not None else pattern)
        name = f"hfprune {criterion}"
        if criterion == "sparsegpt" and (args.damp, args.gpt_block) != (0.01, 128):
            name += f" (damp {args.damp:g}, block {args.gpt_block})"
        if (label, name) in done:
            continue
        model = copy.deepcopy(dense)
        config = SparsityConfig(criterion=criterion, pattern=pattern, ratios=ratios, damp=args.damp,
                                block_size=args.gpt_block,
                                sparsity=sparsity if sparsity is not None else (None if ":" in pattern else 0.5))
        result = hfprune.sparsify(model, calibration, config)
        ppl = perplexity(model, test)["perplexity"]
        rows.append({"pattern": label, "criterion": name, "ppl": ppl, "seconds": result.seconds,
                     "sparsity": block_sparsity(model)})
        print(rows[-1], flush=True)
        if pattern == "2:4" and disk is None:  # sizes depend only on the nonzero count: the same for any 2:4 model
            disk = disk_sizes(dense, model, test[0])
            disk["model"] = f"{criterion} 2:4"
        del model
        save_rows(args, rows, disk, tokens, started, blocks, load)
    if disk is None:  # sizes depend only on the pattern's nonzero count: any 2:4 model has the sparsegpt one's
        model = copy.deepcopy(dense)
        hfprune.sparsify(model, None, SparsityConfig(criterion="magnitude", pattern="2:4"))
        disk = disk_sizes(dense, model, test[0])
        disk["model"] = "magnitude 2:4"
        del model
    save_rows(args, rows, disk, tokens, started, blocks, load)
    del dense
    if args.peer_python and Path(args.peer_python).is_file() and args.peer_runs:
        cmd = [args.peer_python, str(PEER.parent.parent / "sparsity_llmcompressor.py"), "--block-size",
               str(args.block_size), "--calibration-blocks", str(args.calibration_blocks), "--test-blocks",
               str(args.test_blocks), "--runs", args.peer_runs, "--threads", str(args.threads)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--calibration-block-size", str(args.calibration_block_size)] if args.calibration_block_size else []
        try:
            subprocess.run(cmd, check=False, timeout=60 * args.peer_minutes)
        except subprocess.TimeoutExpired:
            print("llm-compressor run stopped at the time limit; its finished rows are kept", flush=True)
    peer = same_blocks_peer(blocks)
    if peer:
        rows += peer["rows"]
    text = render(args, rows, tokens, disk, peer, time.perf_counter() - started, load=load)
    Path(args.out).write_text(text)
    print(text)


def same_blocks_peer(blocks: str | None):
    """llm-compressor's saved rows, if they were measured on the same calibration and test blocks."""
    if not PEER.is_file():
        return None
    peer = json.loads(PEER.read_text())
    if peer.get("blocks") != blocks:
        print(f"{PEER} left out: measured on blocks {peer.get('blocks')}, these are {blocks}", flush=True)
        return None
    return peer


def save_rows(args, rows: list, disk, tokens: int, started: float, blocks: str, load: tuple) -> None:
    data = {"rows": rows, "disk": disk, "tokens": tokens, "seconds": time.perf_counter() - started,
            "argv": sys.argv[1:], "machine": machine(), "blocks": blocks, "load_at_start": load}
    Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def disk_sizes(dense, model, batch: dict) -> dict:
    """Save dense, zeros in place and compact; reload the sparse ones (stock transformers / hfprune) and compare."""
    probe = {"input_ids": batch["input_ids"][:2, :64]}
    with torch.no_grad():
        want = model(**probe).logits
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense.save_pretrained(tmp / "dense")
        hfprune.save_sparse(model, tmp / "plain")
        hfprune.save_sparse(model, tmp / "compact", compact=True)
        for name in ("dense", "plain", "compact"):
            out[name] = sum(f.stat().st_size for f in (tmp / name).glob("*.safetensors"))
        plain = AutoModelForCausalLM.from_pretrained(tmp / "plain").eval()
        compact = hfprune.from_pretrained(tmp / "compact").eval()
        with torch.no_grad():
            out["plain_diff"] = float((plain(**probe).logits - want).abs().max())
            out["compact_diff"] = float((compact(**probe).logits - want).abs().max())
    return out


def render(args, rows, tokens, disk, peer, seconds, argv=None, where=None, load=None, note=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    dense = rows[0]["ppl"]
    lines = [
        "# Weight sparsity on SmolLM2-135M (BBC News)",
        "",
        f"`{' '.join(['python benchmarks/sparsity_smollm2.py', *argv])}` ({seconds / 60:.0f} min). "
        f"Machine: {where or machine()}; load average at start {_load(load)} (seconds are wall time under that "
        "load; perplexities do not depend on it).",
        "",
        f"SmolLM2-135M-Instruct (offline asset, float32); decoder-layer projections sparsified, embeddings and LM "
        f"head dense; retraining-free. Calibration: {args.calibration_blocks} blocks x "
        f"{args.calibration_block_size or args.block_size} tokens of "
        f"the BBC calibration split; test perplexity on {tokens} predicted tokens ({args.test_blocks} blocks) of "
        "the test split. Sparsity: zeros over the decoder layers' Linear weights.",
        "",
        "| pattern | method | test perplexity | vs dense | sparsity | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['pattern']} | {r['criterion']} | {r['ppl']:.3f} | {r['ppl'] / dense - 1:+.1%} | "
                     f"{r['sparsity']:.3f} | {secs} |")
    if peer:
        lines += ["", f"llm-compressor {peer['llmcompressor']} rows from `benchmarks/sparsity_llmcompressor.py "
                      f"{' '.join(peer.get('argv', []))}` (its own venv, transformers pinned by it; same calibration "
                      f"and test blocks, fingerprint {peer.get('blocks')}; {peer['machine']}; load average at start "
                      f"{_load(peer.get('load_at_start'))})."]
    if disk:
        mb = 1 / 2**20
        lines += ["", f"On-disk size of the {disk.get('model', 'sparsegpt 2:4')} model (all safetensors files; the "
                      "embeddings, tied to the head, stay dense; any 2:4 model has the same sizes):", "",
                  "| checkpoint | MiB | vs dense | max logit diff after reload |", "|---|---|---|---|",
                  f"| dense | {disk['dense'] * mb:.1f} | 1.00 | |",
                  f"| zeros in place (stock `AutoModelForCausalLM`) | {disk['plain'] * mb:.1f} | "
                  f"{disk['plain'] / disk['dense']:.2f} | {disk['plain_diff']:.1e} |",
                  f"| compact: bit mask + kept values (`hfprune.from_pretrained`) | {disk['compact'] * mb:.1f} | "
                  f"{disk['compact'] / disk['dense']:.2f} | {disk['compact_diff']:.1e} |"]
    if note:  # a "note" in the JSON: how rows merged from several runs (on the same blocks) were measured
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _load(load) -> str:
    return "unknown" if not load else "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    main()

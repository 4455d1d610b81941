# Copyright hfprune contributors. Apache-2.0.
"""``hfprune search``: search uniform shapes of a saved model under one budget, save the best as a checkpoint.

    hfprune search MODEL_DIR --output DIR (--params_ratio R | --macs_ratio R | --memory_ratio R | --latency_ratio R)
                   [--axes depth,hidden,heads,ffn,experts] [--grid depth=1,0.9,0.8 --grid hidden=1,0.9]
                   [--criterion activation] [--recovery none|obs] [--finalists 1] [--no_finalist_per_kind] [--per_layer]
                   [--context 4096] [--kv_batch 1]
                   [--data bbc_news | --data_files FILE ... | --dataset NAME] [--text_column text]
                   [--max_length 128] [--calibration_rows 64] [--eval_rows 8] [--cache_dir DIR] [--no-plots]

The calibration text comes from the same data options as ``hfprune sparsify`` (``--data_files`` / ``--dataset``
as for ``hfprune prune``, or ``--data bbc_news``); its last ``--eval_rows`` blocks score the candidates, the others
score the axes. Writes the checkpoint and tokenizer, ``search_candidates.md`` / ``.json`` / ``.png`` to ``--output``;
the per-axis scores and candidate scores are cached in ``--cache_dir`` (default ``OUTPUT/search_cache``), so running
again with another budget rescores nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_prune_args import OneLineParser, calibration_texts

USAGE = __doc__.split("\n\n")[1]
BUDGET_FLAGS = ("params_ratio", "macs_ratio", "memory_ratio", "latency_ratio")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..pruning.search import AXES

    parser.add_argument("model_dir", help="saved model directory")
    parser.add_argument("--output", "--output_dir", dest="output", required=True, help="where the checkpoint goes")
    for name in BUDGET_FLAGS:
        parser.add_argument(f"--{name}", type=float, default=None, help=f"keep this fraction of the dense "
                            f"{name.removesuffix('_ratio')}")
    parser.add_argument("--axes", default="depth,hidden,heads,ffn", help=f"comma-separated, from {', '.join(AXES)}")
    parser.add_argument("--grid", action="append", default=[], help="AXIS=F1,F2,... kept fractions (repeatable)")
    parser.add_argument("--criterion", default="activation", help="heads/FFN importance criterion")
    parser.add_argument("--hidden_criterion", default="activation")
    parser.add_argument("--expert_criterion", default="reap")
    parser.add_argument("--recovery", default="none", help="none or obs (structured OBS on the finalists)")
    parser.add_argument("--finalists", type=int, default=1)
    parser.add_argument("--per_layer", action="store_true", help="also per-layer candidates: FFN width and KV "
                        "groups per layer by a knapsack over measured layer sensitivities (remote-code checkpoints)")
    parser.add_argument("--layer_ladder", default=None, help="per-layer FFN fractions, e.g. 0.75,0.5,0.25")
    parser.add_argument("--no_finalist_per_kind", dest="finalist_per_kind", action="store_false",
                        help="recover only the best --finalists, not also the best candidate of every kind of shape")
    parser.add_argument("--seq_len", type=int, default=128, help="MACs and latency counted at this length")
    parser.add_argument("--context", type=int, default=4096, help="memory budget: KV cache tokens per sequence")
    parser.add_argument("--kv_batch", type=int, default=1, help="memory budget: sequences in the KV cache")
    parser.add_argument("--round_to", type=int, default=8, help="FFN width in multiples of this")
    parser.add_argument("--data", default="none", help="bbc_news (offline asset), or none")
    parser.add_argument("--data_files", nargs="+", default=None, help="your own text: file(s), as for hfprune prune")
    parser.add_argument("--dataset", default=None, help="a datasets name or local folder")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per calibration block")
    parser.add_argument("--calibration_rows", type=int, default=64, help="blocks scoring the axes")
    parser.add_argument("--eval_rows", type=int, default=8, help="held-out blocks scoring the candidates")
    parser.add_argument("--cache_dir", default=None, help="default OUTPUT/search_cache")
    parser.add_argument("--distill_steps", type=int, default=0, help="distil the best --distill_finalists "
                        "candidates from the dense model for this many steps on the calibration blocks (0: none)")
    parser.add_argument("--distill_finalists", type=int, default=2)
    parser.add_argument("--distill_lr", type=float, default=5e-5)
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def search_config(args):
    """The :class:`SearchConfig` the flags describe; bad values are refused here, before any model loads."""
    from ..pruning.search import SearchConfig

    given = [name for name in BUDGET_FLAGS if getattr(args, name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one budget: {', '.join('--' + n for n in BUDGET_FLAGS)}; got "
                         f"{', '.join('--' + n for n in given) or 'none'}")
    grid = {}
    for item in args.grid:
        axis, sep, values = item.partition("=")
        try:
            grid[axis.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid {item!r}: write AXIS=F1,F2 with kept fractions, e.g. depth=1,0.9") from None
        if not sep:
            raise ValueError(f"--grid {item!r}: write AXIS=F1,F2 with kept fractions, e.g. depth=1,0.9")
    for name in ("calibration_rows", "eval_rows", "max_length", "distill_finalists"):
        if getattr(args, name) < 1 or (name == "max_length" and args.max_length < 2):
            raise ValueError(f"--{name} {getattr(args, name)} must be >= {2 if name == 'max_length' else 1}")
    if args.distill_steps < 0 or not args.distill_lr > 0:
        raise ValueError(f"--distill_steps {args.distill_steps} must be >= 0 and --distill_lr {args.distill_lr} > 0")
    cache = args.cache_dir if args.cache_dir is not None else os.path.join(args.output, "search_cache")
    extra = {}
    if args.layer_ladder is not None:
        try:
            extra["layer_ladder"] = [float(v) for v in args.layer_ladder.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--layer_ladder {args.layer_ladder!r}: write fractions, e.g. 0.75,0.5,0.25") from None
    return SearchConfig(ratio=getattr(args, given[0]), budget=given[0].removesuffix("_ratio"), axes=args.axes,
                        grid=grid, criterion=args.criterion, hidden_criterion=args.hidden_criterion,
                        expert_criterion=args.expert_criterion, recovery=args.recovery, finalists=args.finalists,
                        finalist_per_kind=args.finalist_per_kind, eval_examples=args.eval_rows,
                        seq_len=args.seq_len, context=args.context,
                        kv_batch=args.kv_batch, round_to=args.round_to, seed=args.seed, cache_dir=cache,
                        per_layer=args.per_layer, **extra)


def main(args) -> int:
    """Run ``hfprune search`` from an argument list or a parsed namespace."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser(OneLineParser(prog="hfprune search", description=USAGE)).parse_args(list(args))
    config = search_config(args)
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is an existing file; give a folder")
    texts = calibration_texts(args)
    if texts is None:
        raise ValueError("hfprune search scores every axis and candidate on text: add --data_files, --dataset or "
                         "--data bbc_news")
    from transformers import AutoTokenizer

    from ..core.checkpoint.load import from_pretrained
    from ..pruning.search import save_report, search

    model = from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    batches = lm_batches(tokenizer, texts, args.max_length, args.calibration_rows + args.eval_rows)
    if not args.distill_steps:
        result = search(model, batches, config)
    else:  # the candidates are scored on the dense model, which then teaches the finalists
        from ..pruning.search.runner import split_examples

        calibration, held_out = split_examples(batches, args.eval_rows)
        result = search(model, calibration, config, eval_data=held_out, apply=False)
        model = distill_finalists(model, result, calibration, held_out, args)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    paths = save_report(result, args.output, plots=args.plots)
    print(result.table())
    print(f"\nchosen: {result.best['label']}; saved to {args.output} (table {paths[0]}, JSON {paths[1]}"
          + (f", plot {paths[2]})" if len(paths) > 2 else ")"))
    return 0


def distill_finalists(dense, result, calibration: list, held_out: list, args):
    """The best ``--distill_finalists`` candidates, each built (with the search's recovery) and distilled from
    ``dense`` for ``--distill_steps`` steps on the calibration blocks, then scored on the held-out blocks again; the
    best is returned and marked chosen in ``result``."""
    import tempfile

    import datasets
    from transformers import TrainingArguments

    from ..core.plan import PrunePlan
    from ..distill import DistillationConfig, DistillationTrainer
    from ..pruning.search.evaluate import evaluate, materialize

    cfg = result.config
    rows = [{k: v.tolist() for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in calibration]
    train = datasets.Dataset.from_dict({
        "input_ids": [r for b in rows for r in b["input_ids"]],
        "attention_mask": [r for b in rows for r in b["attention_mask"]],
        "labels": [r for b in rows for r in b["input_ids"]]}).with_format("torch")
    best, best_model = None, None
    # after a recovery its scores rank the candidates (the recovered ones first); otherwise the search's scores
    ranked = sorted(range(len(result.rows)), key=lambda i: ("recovered_score" not in result.rows[i],
                                                             result.rows[i].get("recovered_score", 0.0),
                                                             result.rows[i]["score"]))
    for i in ranked[: args.distill_finalists]:
        row = result.rows[i]
        student = materialize(dense, PrunePlan.from_dict(row["plan"]), cfg.recovery, calibration,
                              cfg.recovery_examples)
        student.requires_grad_(True)  # the loaded dense model may be frozen; the student trains
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(output_dir=tmp, max_steps=args.distill_steps, learning_rate=args.distill_lr,
                                      per_device_train_batch_size=4, save_strategy="no", report_to=[],
                                      logging_steps=max(1, args.distill_steps // 4), seed=args.seed,
                                      dataloader_num_workers=0, disable_tqdm=True)
            DistillationTrainer(model=student, args=targs, train_dataset=train, teacher=dense,
                                distill_config=DistillationConfig(alpha=0.9)).train()
        student.eval()
        row["distilled_score"] = evaluate(student, held_out)[cfg.metric]
        if best is None or row["distilled_score"] < result.rows[best]["distilled_score"]:
            best, best_model = i, student
    for i, row in enumerate(result.rows):
        row["chosen"] = i == best
    result.chosen = best
    result.plan = PrunePlan.from_dict(result.rows[best]["plan"])
    result.extra["distill"] = {"steps": args.distill_steps, "finalists": args.distill_finalists,
                               "lr": args.distill_lr, "alpha": 0.9}
    return best_model


def lm_batches(tokenizer, texts: list, block_size: int, blocks: int, batch_size: int = 8) -> list:
    """The texts packed into ``blocks`` blocks of ``block_size`` tokens, in batches (the last ones are held out)."""
    import torch

    from ..data.text import pack

    ids = pack(tokenizer(texts, add_special_tokens=False)["input_ids"], block_size, tokenizer.eos_token_id)[:blocks]
    if len(ids) < 2:
        raise ValueError(f"the calibration text holds {len(ids)} block(s) of --max_length {block_size} tokens; the "
                         "search needs at least 2 (one to score the axes, one held out)")
    ids = torch.tensor(ids)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
            for i in range(0, len(ids), batch_size)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

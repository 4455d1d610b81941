# Copyright hfprune contributors. Apache-2.0.
"""``hfprune sparsify``: weight-level sparsity of a saved model, saved as a checkpoint.

    hfprune sparsify MODEL_DIR --output DIR [--criterion wanda] [--sparsity 0.5] [--pattern 2:4] [--ratios owl]
                     [--compact] [--data_files FILE ... | --dataset NAME [--dataset_config C] [--split S] |
                     --data bbc_news] [--text_column text] [--max_length 128] [--calibration_rows 128]

Calibration text (for wanda, sparsegpt, movement, --ratios owl) comes from the same data options as ``hfprune
prune`` (``--data_files`` / ``--dataset``), or ``--data bbc_news`` (the offline BBC asset): the train split's text,
tokenised with the model's tokenizer, packed into ``--max_length`` blocks for a causal LM, truncated rows otherwise.
The model loads with ``hfprune.from_pretrained`` (no code from the checkpoint runs); the output is an ordinary
checkpoint with zeros in place (``--compact``: bit masks plus kept values, for ``hfprune.from_pretrained``), the
tokenizer, and ``sparsity_plan.json``. Prints the per-layer sparsity table.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_prune_args import calibration_texts

USAGE = __doc__.split("\n\n")[1]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SystemExit(f"{self.prog}: error: {message}")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``sparsify`` arguments to ``parser``."""
    from ..pruning.sparsity.config import CRITERIA, RATIOS, TARGETS

    parser.add_argument("model_dir", help="saved model directory")
    parser.add_argument("--output", "--output_dir", dest="output", required=True, help="where the checkpoint goes")
    parser.add_argument("--criterion", default="magnitude", help=f"one of {', '.join(CRITERIA)}")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction of zeros (default 0.5; N:M implies)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured, N:M (2:4) or block:RxC")
    parser.add_argument("--ratios", default="uniform", help=f"one of {', '.join(RATIOS)}")
    parser.add_argument("--targets", default="blocks", help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--compact", action="store_true", help="save bit masks plus kept values")
    parser.add_argument("--data", default="none", help="bbc_news (offline asset), or none")
    parser.add_argument("--data_files", nargs="+", default=None, help="your own text: file(s), as for hfprune prune")
    parser.add_argument("--dataset", default=None, help="a datasets name or local folder")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per calibration row / block")
    parser.add_argument("--calibration_rows", type=int, default=128, help="calibration rows (blocks) used")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsify`` on an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser("sparsify", help="weight-level sparsity (unstructured, N:M, blocks)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(parser)
    parser.set_defaults(func=main)
    return parser


def main(args) -> int:
    """Run ``hfprune sparsify`` from an argument list (``["MODEL_DIR", "--output", ...]``) or parsed namespace."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser(_OneLineParser(prog="hfprune sparsify", description=USAGE)).parse_args(list(args))
    from ..pruning.sparsity import SparsityConfig, save_sparse, sparsify

    config = SparsityConfig(criterion=args.criterion, sparsity=args.sparsity, pattern=args.pattern,
                            ratios=args.ratios, targets=args.targets, seed=args.seed)  # bad flags: before loading
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    texts = calibration_texts(args)
    if config.needs_data and texts is None:
        raise ValueError(f"--criterion {args.criterion} / --ratios {args.ratios} need calibration text: add "
                         "--data_files, --dataset or --data bbc_news")
    from transformers import AutoTokenizer

    from ..core.checkpoint.load import from_pretrained

    model = from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    batches = None if texts is None else _batches(model, tokenizer, texts, args)
    result = sparsify(model, batches, config)
    save_sparse(model, args.output, compact=args.compact)
    tokenizer.save_pretrained(args.output)
    print(result.to_markdown())
    print(f"\n{config.criterion}, {config.pattern}: sparsity {result.plan.sparsity:.4f} in {result.seconds:.1f} s; "
          f"saved to {args.output}{' (compact)' if args.compact else ''}")
    return 0


def _batches(model, tokenizer, texts: list, args, batch_size: int = 8) -> list:
    import torch

    if type(model).__name__.endswith("ForCausalLM"):
        from ..data.text import pack

        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        blocks = pack(ids, args.max_length, tokenizer.eos_token_id)[: args.calibration_rows]
        if not blocks:
            raise ValueError(f"the calibration text holds fewer than --max_length {args.max_length} tokens")
        ids = torch.tensor(blocks)
        return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size]),
                 "labels": ids[i:i + batch_size]} for i in range(0, len(ids), batch_size)]
    texts = texts[: args.calibration_rows]
    return [dict(tokenizer(texts[i:i + batch_size], truncation=True, max_length=args.max_length, padding=True,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# Copyright hfprune contributors. Apache-2.0.
"""``hfprune sparsify``: weight-level sparsity of a saved model, saved as a checkpoint.

    hfprune sparsify MODEL_DIR --output DIR [--criterion wanda] [--sparsity 0.5] [--pattern 2:4] [--ratios owl]
                     [--compact] [--data_files FILE ... | --dataset NAME [--dataset_config C] [--split S] |
                     --data bbc_news] [--text_column text] [--max_length 128] [--calibration_rows 128]
                     [--sequential | --no-sequential] [--dtype bfloat16] [--offload_dir DIR]

Calibration text (for wanda, sparsegpt, movement, --ratios owl) comes from the same data options as ``hfprune
prune`` (``--data_files`` / ``--dataset``), or ``--data bbc_news`` (the offline BBC asset): the train split's text,
tokenised with the model's tokenizer, packed into ``--max_length`` blocks for a causal LM, truncated rows otherwise.
The model loads with ``hfprune.from_pretrained`` (no code from the checkpoint runs); the output is an ordinary
checkpoint with zeros in place (``--compact``: bit masks plus kept values, for ``hfprune.from_pretrained``), the
tokenizer, and ``sparsity_plan.json``. Prints the per-layer sparsity table.

``--sequential`` sparsifies the checkpoint layer by layer from disk
(:func:`hfprune.pruning.sparsity.sequential.sparsify_sequential`: the same weights, never the whole model in
memory); neither flag: layer by layer when the weights would not fit in memory comfortably, as ``hfprune prune``
decides (``--dtype`` or ``--offload_dir`` imply ``--sequential``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_prune_args import OneLineParser, calibration_texts

USAGE = __doc__.split("\n\n")[1]


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
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--sequential", dest="sequential", action="store_true", default=None,
                      help="sparsify layer by layer from disk (default: when the model would not fit in memory)")
    path.add_argument("--no-sequential", dest="sequential", action="store_false", help="load the whole model")
    parser.add_argument("--dtype", default=None, help="layer by layer: load and prune in this dtype (float32, "
                        "bfloat16, float16; default: the checkpoint's)")
    parser.add_argument("--offload_dir", "--offload-dir", dest="offload_dir", default=None,
                        help="layer by layer: keep the calibration activations in this folder")
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
        args = build_parser(OneLineParser(prog="hfprune sparsify", description=USAGE)).parse_args(list(args))
    from ..pruning.sparsity import SparsityConfig, save_sparse, sparsify

    config = SparsityConfig(criterion=args.criterion, sparsity=args.sparsity, pattern=args.pattern,
                            ratios=args.ratios, targets=args.targets, seed=args.seed)  # bad flags: before loading
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    sequential = _choose_path(args, config)
    texts = calibration_texts(args)
    if config.needs_data and texts is None:
        raise ValueError(f"--criterion {args.criterion} / --ratios {args.ratios} need calibration text: add "
                         "--data_files, --dataset or --data bbc_news")
    from transformers import AutoConfig, AutoTokenizer

    from ..core.checkpoint.load import from_pretrained

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if sequential:
        from ..pruning.sparsity.sequential import sparsify_sequential

        causal = any(a.endswith("ForCausalLM") for a in AutoConfig.from_pretrained(args.model_dir).architectures or [])
        batches = None if texts is None else _batches(causal, tokenizer, texts, args)
        result = sparsify_sequential(args.model_dir, batches, config, args.output, dtype=args.dtype,
                                     offload_dir=args.offload_dir, compact=args.compact,
                                     stage=lambda folder, _result: tokenizer.save_pretrained(folder))
        print(result.to_markdown())
        print(f"\n{config.criterion}, {config.pattern}: sparsity {result.plan.sparsity:.4f} in {result.seconds:.1f} "
              f"s, layer by layer; saved to {args.output}{' (compact)' if args.compact else ''}")
        return 0
    model = from_pretrained(args.model_dir)
    batches = None if texts is None else _batches(type(model).__name__.endswith("ForCausalLM"), tokenizer, texts,
                                                  args)
    result = sparsify(model, batches, config)
    save_sparse(model, args.output, compact=args.compact)
    tokenizer.save_pretrained(args.output)
    print(result.to_markdown())
    print(f"\n{config.criterion}, {config.pattern}: sparsity {result.plan.sparsity:.4f} in {result.seconds:.1f} s; "
          f"saved to {args.output}{' (compact)' if args.compact else ''}")
    return 0


def _choose_path(args, config) -> bool:
    """Layer by layer or in memory, as ``hfprune prune`` decides (:func:`~hfprune.pipeline.sequential_run.choose_path`),
    logged with the reason; bad ``--dtype`` / ``--offload_dir`` refused before any data is read."""
    import logging

    from .sequential_run import check_options, choose_path

    layerwise_only = args.dtype is not None or args.offload_dir is not None
    requested = True if args.sequential is None and layerwise_only else args.sequential
    sequential, why = choose_path(requested, config, args.model_dir)
    if not sequential and layerwise_only:
        raise ValueError("--dtype and --offload_dir apply to layer-by-layer sparsity; drop --no-sequential")
    check_options(args.dtype, args.offload_dir)
    logging.getLogger("hfprune").info("%s path: %s", "layer-by-layer" if sequential else "in-memory", why)
    return sequential


def _batches(causal: bool, tokenizer, texts: list, args, batch_size: int = 8) -> list:
    import torch

    if causal:
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

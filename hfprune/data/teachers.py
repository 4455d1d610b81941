# Copyright hfprune contributors. Apache-2.0.
"""Fine-tuned teachers built from the offline assets once, then cached (they take minutes on a CPU).

``movie_review_teacher()`` is the MiniLM sentiment classifier that the one-shot, gradual and recipe benchmarks
all start from, so they compare against the same dense model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from .assets import cache_dir, minilm_dir
from .movie_reviews import movie_reviews

MOVIE_TEACHER = {"epochs": 2, "lr": 5e-5, "batch": 32, "max_length": 64, "seed": 0, "warmup_ratio": 0.1}


def tokenize_movie_reviews(tokenizer, seed: int = 0, max_length: int = 64):
    """The seeded movie-review split, tokenised (no padding: pad per batch with DataCollatorWithPadding)."""
    data = movie_reviews(seed)
    return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                    remove_columns=["text"])


def movie_review_teacher(rebuild: bool = False) -> Path:
    """Directory of all-MiniLM-L6-v2 fine-tuned on the movie-review train split (cached under
    ``cache_dir()/teachers``; about 10 minutes on 2 CPU cores the first time). ``teacher.json`` in it records the
    settings and the validation accuracy."""
    key = "minilm-movie-" + "-".join(f"{k}{v}" for k, v in sorted(MOVIE_TEACHER.items()))
    target = cache_dir() / "teachers" / key
    if (target / "teacher.json").is_file() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (benchmarks, recipes) may ask at once: one builds, the others wait and then find it.
    with FileLock(target.parent / f"{key}.lock"):
        if (target / "teacher.json").is_file() and not rebuild:
            return target
        _build_movie_teacher(target)
    return target


def _build_movie_teacher(target: Path) -> None:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    s = MOVIE_TEACHER
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    data = tokenize_movie_reviews(tokenizer, s["seed"], s["max_length"])
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        args = TrainingArguments(
            output_dir=os.path.join(tmp, "run"), num_train_epochs=s["epochs"], learning_rate=s["lr"],
            per_device_train_batch_size=s["batch"], per_device_eval_batch_size=128, warmup_steps=s["warmup_ratio"],
            weight_decay=0.01, seed=s["seed"], save_strategy="no", report_to=[], logging_steps=50,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        )
        trainer.train()
        metrics = trainer.evaluate()
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "teacher.json").write_text(json.dumps({"settings": s, "validation": metrics}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-trained teacher is never found in the cache

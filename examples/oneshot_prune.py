# Copyright hfprune contributors. Apache-2.0.
"""One-shot pruning of the real all-MiniLM-L6-v2 to a MACs budget, Fisher scores on a few movie-review batches.

Needs the offline assets (``make install``, or ``bash benchmarks/install_assets.sh``). Usage::

    python examples/oneshot_prune.py                                   # 128 sentences, 60% of the MACs
    python examples/oneshot_prune.py --macs-ratio 0.5 --examples 256 --output-dir minilm-pruned
    python examples/oneshot_prune.py --model-dir DIR                   # e.g. a fine-tuned classifier

The default model gets a fresh 2-label head, so this shows the API, not accuracy: `hfprune run` (the embedded
default recipe) fine-tunes the classifier first and evaluates the pruned one.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hfprune
from hfprune.data.assets import minilm_dir
from hfprune.data.movie_reviews import movie_reviews

parser = argparse.ArgumentParser()
parser.add_argument("--model-dir", default=None, help="default: the offline all-MiniLM-L6-v2")
parser.add_argument("--macs-ratio", type=float, default=0.6)
parser.add_argument("--examples", type=int, default=128, help="calibration sentences")
parser.add_argument("--output-dir", default=None, help="save the pruned checkpoint here")
args = parser.parse_args()

model_dir = args.model_dir or minilm_dir()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

sentences = movie_reviews(seed=0)["train"].select(range(args.examples))  # columns: text, label
calibration = sentences.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                            remove_columns=["text"])
config = hfprune.PruningConfig(criterion="fisher", macs_ratio=args.macs_ratio, seq_len=64)
result = hfprune.prune(model, calibration, config, tokenizer=tokenizer)  # score, select, rearrange, slice
print(result.table())
if args.output_dir:
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")

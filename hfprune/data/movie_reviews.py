# Copyright hfprune contributors. Apache-2.0.
"""The 10,568 polar movie-review sentences (Pang & Lee, via vaderSentiment's sdist) as a seeded split."""

from __future__ import annotations

from .assets import INSTALL_HINT, AssetMissing, cache_dir

SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def movie_reviews(seed: int = 0):
    """A ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` (80/10/10, shuffled with ``seed``),
    columns ``text`` and ``label`` (1 when the mean rating is positive; neutral sentences, rating 0, dropped).

    The split depends only on ``seed`` and the file, so every benchmark and recipe sees the same test set.
    """
    import datasets

    path = cache_dir() / "vader" / "movieReviewSnippets_GroundTruth.txt"
    if not path.is_file():
        raise AssetMissing(f"{path} not found (the movie-review sentences); {INSTALL_HINT}")
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or float(parts[1]) == 0:
            continue
        texts.append(parts[2].strip())
        labels.append(int(float(parts[1]) > 0))
    full = datasets.Dataset.from_dict({"text": texts, "label": labels}).shuffle(seed=seed)
    n_train = int(SPLITS["train"] * len(full))
    n_val = int(SPLITS["validation"] * len(full))
    return datasets.DatasetDict({
        "train": full.select(range(n_train)),
        "validation": full.select(range(n_train, n_train + n_val)),
        "test": full.select(range(n_train + n_val, len(full))),
    })

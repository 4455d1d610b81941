# Copyright hfprune contributors. Apache-2.0.
"""Build (or find) the cached MiniLM movie-review teacher and print its directory and validation accuracy.

    python benchmarks/teacher.py [--rebuild]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hfprune.data.teachers import movie_review_teacher  # noqa: E402

if __name__ == "__main__":
    path = movie_review_teacher(rebuild="--rebuild" in sys.argv)
    print(path)
    print(json.dumps(json.loads((path / "teacher.json").read_text())["validation"], indent=2))

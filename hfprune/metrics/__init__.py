# Copyright hfprune contributors. Apache-2.0.
"""Task metrics as local ``evaluate`` modules, so evaluation works offline.

``load("accuracy")`` loads the module shipped here (``evaluate.load(<folder>)``, no network); any other name
goes to the Hub through ``evaluate.load`` as usual and, offline, fails with a message that says so and lists the
local ones.

Example:

```python
>>> from hfprune import metrics
>>> metrics.load("accuracy").compute(predictions=[1, 0], references=[1, 1])
{'accuracy': 0.5}
```
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCAL_METRICS = ("accuracy", "f1", "mae", "mase", "mse", "perplexity")


class MetricUnavailable(RuntimeError):
    """A metric that is neither shipped with hfprune nor reachable on the Hub."""


def local_path(name: str) -> Path:
    """The folder of the local evaluate module ``name`` (one of :data:`LOCAL_METRICS`)."""
    if name not in LOCAL_METRICS:
        raise ValueError(f"no local metric {name!r}; hfprune ships {list(LOCAL_METRICS)}")
    return HERE / name


def load(name: str, **kwargs):
    """An ``evaluate.EvaluationModule``: the local module for hfprune's metrics, else ``evaluate.load(name)``."""
    import evaluate

    if name in LOCAL_METRICS:
        return evaluate.load(str(local_path(name)), **kwargs)
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    try:
        return evaluate.load(name, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"it could not be fetched ({type(err).__name__}: {err})"
        raise MetricUnavailable(
            f"metric {name!r} is not shipped with hfprune and {why}; offline, use one of {list(LOCAL_METRICS)}, "
            f"or a local evaluate module by path"
        ) from err

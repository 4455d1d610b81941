# Copyright hfprune contributors. Apache-2.0.
"""A per-layer latency table measured on the current device, for latency budgets (as Kwon et al. 2022 do).

Each attention block is timed as a function of its kept heads (whole key/value groups) and each FFN block as a
function of its kept neurons, at a given batch size and sequence length, at a few widths. Blocks with the same
shapes share one measurement. Each block's curve is fitted as ``L(k) = intercept + slope * k`` for ``k >= 1``
and ``L(0) = 0`` (the block is gone), with a non-negative intercept and slope, so predictions are monotone in
``k``: Kwon et al. observe latency is flat below a small width and linear above it; a line through the measured
widths is the conservative version of that for the widths a budget keeps.

The timing runs stand-in modules with the block's shapes (the projections, scaled dot-product attention, the
activation), not the model's own forward, so one table serves every supported family.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.apply import unwrap
from ..core.blocks import iter_blocks
from ..core.structure import in_features, out_features

if TYPE_CHECKING:
    from torch.utils.benchmark import Timer


@dataclass(frozen=True)
class BlockLatency:
    """Measured ``seconds`` at ``widths`` (heads or neurons) and the fitted line."""

    widths: tuple
    seconds: tuple
    intercept: float
    slope: float

    def predict(self, k: int) -> float:
        return 0.0 if k <= 0 else self.intercept + self.slope * k


@dataclass
class LatencyTable:
    """Per block ``(stack, layer, block)``: its :class:`BlockLatency`. Save and load as JSON."""

    batch_size: int
    seq_len: int
    device: str
    entries: dict = field(default_factory=dict)

    def predict(self, counts: dict) -> float:
        """Seconds for ``{block key: kept heads or neurons}``; blocks not named count at full width."""
        return sum(e.predict(counts.get(k, e.widths[-1])) for k, e in self.entries.items())

    def dense(self) -> float:
        return sum(e.predict(e.widths[-1]) for e in self.entries.values())

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "device": self.device,
                "entries": [{"key": list(k), **asdict(e)} for k, e in self.entries.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        entries = {tuple(e["key"]): BlockLatency(tuple(e["widths"]), tuple(e["seconds"]), e["intercept"],
                                                 e["slope"]) for e in d["entries"]}
        return cls(d["batch_size"], d["seq_len"], d["device"], entries)

    def save(self, path) -> None:
        path = Path(path)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(f.name, path)

    @classmethod
    def load(cls, path) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_line(widths, seconds) -> tuple:
    """Least-squares ``(intercept, slope)`` with both clamped to be non-negative (monotone, never below 0)."""
    x = torch.tensor(widths, dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    if len(x) == 1:
        return 0.0, float(y[0] / x[0])
    a = torch.stack([torch.ones_like(x), x], 1)
    intercept, slope = torch.linalg.lstsq(a, y[:, None]).solution.flatten().tolist()
    if slope < 0:  # flat: latency does not grow over the measured widths
        return float(y.mean()), 0.0
    if intercept < 0:  # through the origin
        return 0.0, float((x * y).sum() / (x * x).sum())
    return intercept, slope


class _Attention(nn.Module):
    def __init__(self, hidden, out, heads, kv_heads, head_dim, fused):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim) if fused else None
        self.q = None if fused else nn.Linear(hidden, heads * head_dim)
        self.kv = None if fused else nn.Linear(hidden, 2 * kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, out)

    def forward(self, x):  # (B, T, hidden)
        b, t, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                         self.kv_heads * self.head_dim], -1)
        else:
            q = self.q(x)
            k, v = self.kv(x).chunk(2, -1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        ctx = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(ctx.transpose(1, 2).reshape(b, t, -1))


class _Ffn(nn.Module):
    def __init__(self, hidden, out, neurons, n_up):
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(hidden, neurons) for _ in range(n_up))
        self.down = nn.Linear(neurons, out)

    def forward(self, x):
        h = nn.functional.gelu(self.ups[0](x))
        for up in self.ups[1:]:  # gated (SwiGLU-style) FFNs multiply in the other projections
            h = h * up(x)
        return self.down(h)


def _timer(stmt: str, **names) -> Timer:
    """A ``torch.utils.benchmark.Timer`` running ``stmt`` on ``names`` with torch's current thread count (its
    default is one thread, which is not what a model is run with). Its clock synchronises the accelerator, if any,
    before each reading, so asynchronous GPU work is counted."""
    # imported here: torch.utils.benchmark loads setuptools and torch's C++ extension builder (~0.1 s), which
    # importing hfprune.prune (through LatencyTable) should not pay for
    from torch.utils.benchmark import Timer

    return Timer(stmt, globals=names, num_threads=torch.get_num_threads())


def _time(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` single forwards; each ``timeit(1)`` first runs two untimed ones."""
    timer = _timer("module(x)", module=module, x=x)
    with torch.inference_mode():
        return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def _widths(n: int, points: int, step: int = 1) -> list:
    """``points`` widths spread over ``step..n`` (multiples of ``step``), ending at the full width ``n``."""
    units = n // step
    picks = sorted({max(1, round(units * (j + 1) / points)) for j in range(points)})
    return [p * step for p in picks]


def measure(model: nn.Module, batch_size: int = 32, seq_len: int = 128, points: int = 4,
            repeats: int = 5) -> LatencyTable:
    """Time every prunable block of ``model`` at ``points`` widths on the model's device and dtype: each width's
    seconds are the median of ``repeats`` forwards, timed with ``torch.utils.benchmark.Timer`` at torch's current
    thread count.

    Example:

    ```python
    >>> from transformers import BertConfig, BertModel
    >>> from hfprune.pruning.latency import measure
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64))
    >>> table = measure(model, batch_size=2, seq_len=8, points=2, repeats=1)
    >>> sorted(table.entries)[0]
    ('layers', 0, 'ffn')
    ```
    """
    if batch_size < 1 or seq_len < 1 or points < 1 or repeats < 1:
        raise ValueError(f"batch_size, seq_len, points and repeats must be >= 1, got {batch_size}, {seq_len}, "
                         f"{points}, {repeats}")
    model = unwrap(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cache: dict = {}
    table = LatencyTable(batch_size, seq_len, _device_name(device))
    for block in iter_blocks(model):
        units, kv_units, head_dim = block.dims()
        if units == 0 or block.is_expert:  # routed experts are not timed: a latency budget keeps them
            continue
        hidden = in_features(block.input_projections()[0])
        out = out_features(block.output_projection())
        if block.is_attention:
            fused = block.spec.fused_qkv
            sig = ("attention", hidden, out, units, kv_units, head_dim, fused)
            if sig not in cache:
                group = units // kv_units
                widths = _widths(units, points, group)
                x = torch.randn(batch_size, seq_len, hidden, device=device, dtype=dtype)
                secs = [_time(_Attention(hidden, out, w, w // group, head_dim, fused).to(device, dtype), x, repeats)
                        for w in widths]
                cache[sig] = BlockLatency(tuple(widths), tuple(secs), *fit_line(widths, secs))
        else:
            n_up = len(block.spec.up)
            sig = ("ffn", hidden, out, units, n_up)
            if sig not in cache:
                widths = _widths(units, points)
                x = torch.randn(batch_size, seq_len, hidden, device=device, dtype=dtype)
                secs = [_time(_Ffn(hidden, out, w, n_up).to(device, dtype), x, repeats) for w in widths]
                cache[sig] = BlockLatency(tuple(widths), tuple(secs), *fit_line(widths, secs))
        table.entries[block.key] = cache[sig]
    return table


@torch.inference_mode()
def time_models(models: dict, batch: dict, rounds: int, warmup: int = 3) -> dict:
    """``{name: [ms per forward of batch, one per round]}`` for whole models (end-to-end latency, unlike the
    per-block table above). Models alternate within each round, in reversed order every other round, so changes
    in machine load hit them alike; ``warmup`` untimed passes each first pay for allocation and thread start-up.
    Each timed forward is one ``Timer.timeit(1)``, which runs two untimed forwards of the same model just before
    it (so every model is timed warm, whichever ran before it), at torch's current thread count."""
    names = list(models)
    timers = {}
    for name, m in models.items():
        m.eval()
        for _ in range(warmup):
            m(**batch)
        timers[name] = _timer("model(**batch)", model=m, batch=batch)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timers[name].timeit(1).mean * 1000)
    return times


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {cpu_name()}, {torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows: tables name the hardware they ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

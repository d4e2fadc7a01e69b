"""Latency measurement done right: warm-up, device synchronisation around every call, percentiles.

The reference timed CUDA calls without synchronising (it measured kernel launches) and without ``no_grad``; here
every timed call ends with :func:`synchronize` and the PyTorch callables run under ``torch.inference_mode``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (benchmark tables name the machine), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: str) -> None:
    """Wait for queued accelerator work (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    elif device.startswith("mps"):
        import torch

        torch.mps.synchronize()


def time_calls(fn: Callable[[], object], n: int, warmup: int, device: str = "cpu") -> list[float]:
    """Seconds of ``n`` calls of ``fn`` after ``warmup`` untimed calls, synchronising the device around each."""
    if n < 1 or warmup < 0:
        raise ValueError(f"need n >= 1 and warmup >= 0, got n={n}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    timings = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return timings


@dataclass(frozen=True)
class TimingStats:
    """Summary of per-call latencies, in milliseconds."""

    name: str
    mean: float
    sd: float
    min: float
    max: float
    median: float
    p95: float
    p99: float
    items_per_call: int = 1

    @classmethod
    def of(cls, name: str, seconds: Sequence[float], items_per_call: int = 1) -> TimingStats:
        ms = 1e3 * np.asarray(seconds, dtype=np.float64)
        median, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(name, ms.mean(), ms.std(), ms.min(), ms.max(), float(median), float(p95), float(p99), items_per_call)

    @property
    def items_per_second(self) -> float:
        """Throughput at the median latency."""
        return 1e3 * self.items_per_call / self.median

    def line(self) -> str:
        """The reference's output line (``benchmark_utils.print_timings``)."""
        return (
            f"[{self.name}] mean={self.mean:.2f}ms, sd={self.sd:.2f}ms, min={self.min:.2f}ms, max={self.max:.2f}ms, "
            f"median={self.median:.2f}ms, 95p={self.p95:.2f}ms, 99p={self.p99:.2f}ms"
        )


def markdown_table(rows: Sequence[TimingStats], unit: str = "items") -> str:
    """A summary table: name, median latency, p95, throughput."""
    lines = [f"| run | median ms | p95 ms | {unit}/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.median:.2f} | {r.p95:.2f} | {r.items_per_second:.2f} |" for r in rows]
    return "\n".join(lines)

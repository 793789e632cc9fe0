"""Interleaved repetitions: the only timing that means something on a shared machine.

``interleaved({"a": fa, "b": fb}, reps=7)`` calls every function ``warmup`` times untimed, then
runs ``reps`` rounds; each round calls every function once, in an order rotated by one each
round, so that a slow spell of the machine (other processes, frequency changes) is spread over
all contenders instead of landing on one.  Compare medians of one run, as ratios; absolute times
from a shared CPU are not comparable across runs.

On CUDA pass ``sync=torch.cuda.synchronize`` so that each timed call includes its kernels.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["interleaved", "summarize"]


def interleaved(tasks: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every task, ``reps`` samples each (see the module docstring)."""
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"invalid reps={reps!r}: accepted range is an integer >= 1")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"invalid warmup={warmup!r}: accepted range is an integer >= 0")
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
    if sync is not None:
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            tasks[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(samples: list[float]) -> dict:
    """Median, quartiles, min and count of a list of timings (seconds)."""
    if not samples:
        raise ValueError("no timing samples to summarize")
    xs = sorted(samples)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "n": len(xs)}

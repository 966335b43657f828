"""Timing helpers for ``lesionkit benchmark``: rates over repeated steps, and latencies of calls compared side by
side."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a clock read afterwards counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step, items: int, repeats: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """Items per second of ``step()`` (which handles ``items`` items), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return items * repeats / (time.perf_counter() - start)


def latencies(calls: dict, repeats: int, rounds: int = 5) -> dict:
    """Median seconds of one call of each of ``calls`` (name: function), timed call by call over ``rounds``
    rounds of ``repeats`` calls in alternating order. On a busy machine one side's latency swings widely from one
    pass to the next (docs/speed.md has an example), so neither side may have the quiet or the busy moments to
    itself, and a stray slow call does not move the median."""
    times = {name: [] for name in calls}
    for round_ in range(rounds):
        for name in list(calls) if round_ % 2 == 0 else list(calls)[::-1]:
            calls[name]()  # untimed: caches and thread pools warm again after the other side ran
            for _ in range(repeats):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}

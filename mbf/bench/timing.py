"""Timing and memory of one measured callable."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mbf.io import peak_rss, reset_peak_rss  # one home, shared with mbf.experiment

__all__ = ["peak_memory", "peak_rss", "reset_peak_rss", "summarize", "time_fn"]


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup: int = 3,
    rep: int = 10,
    events: bool = True,
    samples: bool = False,
) -> dict:
    """Median, p20 and p80 milliseconds of ``fn``.

    Args:
        fn: what to time; called ``warmup + rep`` times (CUDA events: as many as fit ~100 ms).
        device: where ``fn`` runs.
        warmup: untimed calls first (the wall-clock loop only).
        rep: timed calls (the wall-clock loop only).
        events: on CUDA, time with CUDA events (``triton.testing.do_bench``); False: a wall-clock
            loop that synchronises after each call, for callables too long or too stateful to repeat.
        samples: the wall-clock loop also returns every timed call's ms as ``"samples"`` (to pool the
            calls of several interleaved runs before taking their median).

    Returns:
        ``{"ms", "p20", "p80"}`` (+ ``"samples"``).
    """
    cuda = torch.device(device).type == "cuda"
    if cuda and events:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {**summarize(times), **({"samples": times} if samples else {})}


def summarize(times: list[float]) -> dict:
    """``{"ms", "p20", "p80"}``: the median and the 20th / 80th percentiles of ``times`` (ms)."""
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "p20": q[1], "p80": q[7]}


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA bytes allocated beyond what was held before ``fn`` (None on CPU: use a fresh
    process's peak RSS there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base

"""How ``backend="auto"`` times its candidates (``mbf.functional.dispatch`` decides when and caches).

On the first call of a case, each candidate runs once untimed (compile, autotune) and once timed
(to size a batch); then ``rounds`` rounds, candidates interleaved in a rotating order, each timed as
``inner`` back-to-back calls with one synchronisation around the batch, not each call (host work
overlaps the device's, as in training). A candidate's time is the median per call; its spread the
half inter-quartile range over the median. The torch path is kept unless another candidate is faster
by more than the margin ``max(MARGIN, spread_torch + spread_best)``: the margin comes from the
measured noise, and both are recorded with the choice (``measure``).

The measurement runs in a fresh thread that the caller joins (``in_fresh_thread``). Grad mode,
inference mode, autocast, saved-tensor hooks (activation checkpointing, ``save_on_cpu``) and dispatch
modes are thread-local, so it sees none of the caller's: a checkpointed layer's measurement cannot
fire the checkpoint's hooks (before, its backward unpacked into the checkpoint, whose recompute
called ``auto`` again and waited forever on the lock the measurement held).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch

__all__ = ["MARGIN", "Timer", "cuda_event_timer", "in_fresh_thread", "is_measuring", "lora_bench", "measure"]

MARGIN = 0.02  # the least fraction by which another candidate must beat the torch path to replace it

# ms of one call of the thunk, synchronised around it; a thunk's ``candidate`` attribute names what it runs
Timer = Callable[[Callable[[], object]], float]

_local = threading.local()  # .measuring: this thread is a measurement's


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cuda_event_timer(fn: Callable[[], object], reps: int = 1) -> float:
    """Median ms of ``reps`` calls of ``fn``, each synchronised before and after: CUDA events where
    CUDA is in use, else a wall clock (CPU tensors: the harness, the CPU dry run of the GPU script).
    ``fn`` is the dispatcher's batch of back-to-back calls; the warm-up is the dispatcher's."""
    times = []
    for _ in range(reps):
        _sync()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def is_measuring() -> bool:
    """This thread runs a measurement (which never measures again)."""
    return getattr(_local, "measuring", False)


def in_fresh_thread(fn: Callable[[], dict], device: torch.device | None) -> dict:
    """``fn()`` in a new thread, joined: none of the caller's thread-local autograd state (grad and
    inference mode, autocast, saved-tensor hooks, dispatch modes) applies to it."""
    out: dict = {}

    def target() -> None:
        _local.measuring = True
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = err

    worker = threading.Thread(target=target, name="mbf-dispatch-measure", daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _label(thunk: Callable, name: str) -> None:
    """Name the candidate a thunk runs (``thunk.candidate``), for timers that report per candidate."""
    try:
        thunk.candidate = name
    except AttributeError:  # a builtin or a bound method: unlabelled
        pass


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(
    names: list[str],
    bench: Callable[[str], Callable[[], object]],
    timer: Timer,
    *,
    rounds: int,
    batch_ms: float,
    max_inner: int,
    fallback: str,
    what: str,
) -> dict:
    """Time the candidates ``names`` (``bench(name)``: a thunk running one once) by the module's rule.

    Returns:
        The entry to cache: ``backend`` (the choice; ``fallback`` when every candidate failed),
        ``ms`` and ``spread`` per candidate, ``margin``, ``inner``, ``rounds`` and ``notes`` (why a
        candidate was skipped). ``what`` names the case in the warning of a skipped candidate.
    """
    notes: dict[str, str] = {}
    thunks: dict[str, Callable[[], object]] = {}
    single: dict[str, float] = {}
    for name in names:
        try:
            once = bench(name)
            _label(once, name)
            once()  # compile and autotune, untimed
            single[name] = float(timer(once))
            thunks[name] = once
        except Exception as err:  # noqa: BLE001 - a candidate that fails here is not chosen
            notes[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            warnings.warn(f"dispatch {what}: candidate {name!r} skipped ({notes[name]})", stacklevel=6)
    if not thunks:
        return {"backend": fallback, "ms": {}, "spread": {}, "margin": MARGIN, "notes": notes, "inner": 0,
                "rounds": 0}  # fmt: skip
    fastest = max(min(single.values()), 1e-6)
    inner = max(1, min(max_inner, math.ceil(batch_ms / fastest)))
    order = list(thunks)
    samples: dict[str, list[float]] = {name: [] for name in order}
    for rnd in range(rounds):
        shift = rnd % len(order)
        for name in order[shift:] + order[:shift]:  # interleaved, each first in turn

            def batch(once=thunks[name]):
                result = None
                for _ in range(inner):
                    result = once()
                return result

            _label(batch, name)
            samples[name].append(float(timer(batch)) / inner)
    ms, spread = {}, {}
    for name, values in samples.items():
        q1, med, q3 = _quartiles(values)
        ms[name] = med
        spread[name] = (q3 - q1) / (2 * med) if med > 0 else 0.0
    best = min(ms, key=ms.get)
    margin = MARGIN
    if "torch" in ms and best != "torch":
        margin = max(MARGIN, spread["torch"] + spread[best])
        if ms["torch"] <= ms[best] * (1.0 + margin):
            best = "torch"  # within the margin: keep the cuBLAS path (the promise: never slower)
    return {
        "backend": best,
        "ms": {k: round(v, 6) for k, v in ms.items()},
        "spread": {k: round(v, 4) for k, v in spread.items()},
        "margin": round(margin, 4),
        "inner": inner,
        "rounds": rounds,
        "notes": notes,
    }


def lora_bench(run: Callable, args: tuple, nf4: bool, M: int, N: int, train: bool):
    """``bench(name)`` for a LoRA case: a thunk running ``run`` (``lora_linear``) with candidate
    ``name`` once, forward (and backward when ``train``) on fresh ``(M, in)`` inputs shaped like the
    caller's. ``args``: the caller's ``(x, weight, bias, A, B, scaling, merged_B, lam, dropout)``."""
    x, weight, bias, A, B, scaling, merged_B, lam, dropout = args

    def bench(name: str) -> Callable[[], None]:
        gen = torch.Generator(x.device).manual_seed(0)  # the caller's random streams stay untouched
        xs = torch.randn(M, x.shape[-1], generator=gen, device=x.device, dtype=x.dtype)
        xs.requires_grad_(train)
        As, Bs = (t.detach().clone().requires_grad_(train) for t in (A, B))
        dy = torch.randn(M, N, generator=gen, device=x.device, dtype=x.dtype)
        if nf4:
            kw = {"backend": "torch"} if name == "torch" else {"backend": "triton", "nf4_path": name}
        else:
            kw = {"backend": name}

        def once() -> None:
            xs.grad = As.grad = Bs.grad = None  # no gradient accumulation in the timing
            with torch.enable_grad() if train else torch.no_grad():
                y = run(xs, weight, bias, As, Bs, scaling, merged_B, lam, dropout=dropout, seed=0, **kw)
                if train:
                    y.backward(dy)

        return once

    return bench

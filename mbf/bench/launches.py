"""Every kernel a callable launches: a per-kernel time breakdown (CUDA events) and a count of the
Triton variants it needs (each one a compile on a cold GPU machine).

``LaunchRecorder`` wraps, while it is active, the ``run`` of Triton's jitted functions (compiled
and interpreted alike) and every aten op (a ``TorchDispatchMode``: cuBLAS GEMMs, copies, adds).
Each launch is bracketed by two CUDA events on the current stream (a wall clock on the CPU), so a
kernel's time is the stream's time between them: its run time while the GPU is the bottleneck,
plus launch latency where the CPU is. Ops of the ``mbf`` namespace (the fused custom ops) are not
recorded themselves: the Triton kernels inside them are.

Counting variants costs each launch a few microseconds of Python (a dict lookup for the kernel's
constexpr names, computed once per kernel, and one tuple into a set); a timed loop must not pay
even that, so ``paused()`` takes the hook out while one runs. A variant is first launched in a
measurement's untimed warm-up call (compiles and autotuning happen there), which is where it is
counted.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchRecorder", "breakdown"]


def _jit_classes() -> list[type]:
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


def _constexpr_names(jit) -> frozenset[str]:
    fn = getattr(jit, "fn", None)
    if fn is None:
        return frozenset()
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if "constexpr" in str(p.annotation))


class _Repr(str):
    """A value's repr standing in for an unhashable value: ``repr`` gives it back unquoted."""

    def __repr__(self) -> str:
        return str(self)


class _Mark:
    """A point on the stream (CUDA event) or in wall-clock time (CPU)."""

    def __init__(self, cuda: bool) -> None:
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.t = time.perf_counter()

    def ms_to(self, other: _Mark) -> float:
        if hasattr(self, "event"):
            return self.event.elapsed_time(other.event)
        return (other.t - self.t) * 1e3


class _AtenSpans(TorchDispatchMode):
    def __init__(self, recorder: LaunchRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mbf":
            return func(*args, **(kwargs or {}))
        start = _Mark(self.recorder.cuda)
        out = func(*args, **(kwargs or {}))
        self.recorder.spans.append((f"aten.{func.overloadpacket.__name__}", start, _Mark(self.recorder.cuda)))
        return out


class LaunchRecorder:
    """Context manager: ``with LaunchRecorder(cuda) as rec: fn()``; then ``rec.per_kernel()`` and
    ``rec.variants`` (distinct Triton specialisations launched: name + constexprs + dtypes).

    Args:
        cuda: time with CUDA events (else a wall clock).
        timed: record spans (False: only count variants; pause it around timed loops).
        aten: also record aten ops (cuBLAS GEMMs and the rest), not only Triton kernels.
    """

    def __init__(self, cuda: bool, timed: bool = True, aten: bool = True) -> None:
        self.cuda, self.timed = cuda, timed
        self.spans: list[tuple[str, _Mark, _Mark]] = []
        self._keys: set[tuple] = set()  # raw variant keys, made readable by ``variants``
        self._consts: dict[int, tuple[object, str, tuple[str, ...]]] = {}  # id(jit) -> (jit, name, names)
        self._saved: list[tuple[type, object, object]] = []  # (class, its run, our wrapper)
        self._paused = False
        self._mode = _AtenSpans(self) if aten and timed else None

    @property
    def variants(self) -> set[tuple]:
        """``{(kernel, ((constexpr, repr(value)), ...), (dtype, ...))}`` of every launch so far."""
        out = set()
        for name, consts, dtypes in self._keys:
            spec = tuple(sorted((k, repr(v)) for k, v in consts))
            out.add((name, spec, tuple(str(d) for d in dtypes)))
        return out

    def _kernel(self, jit) -> tuple[str, tuple[str, ...]]:
        """(name, constexpr parameter names) of ``jit``: read from its signature once per kernel."""
        hit = self._consts.get(id(jit))
        if hit is None or hit[0] is not jit:
            hit = (jit, getattr(jit.fn, "__name__", "triton"), tuple(sorted(_constexpr_names(jit))))
            self._consts[id(jit)] = hit  # holds jit: its id is not reused while cached
        return hit[1], hit[2]

    def _count(self, jit, args: tuple, kwargs: dict) -> None:
        """Add this launch's variant: raw values only (made readable by ``variants``, off the hot path)."""
        name, consts = self._kernel(jit)
        spec = tuple((k, kwargs[k]) for k in consts if k in kwargs)
        dtypes = tuple(a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        try:
            self._keys.add((name, spec, dtypes))
        except TypeError:  # an unhashable constexpr value: keep its repr
            self._keys.add((name, tuple((k, _Repr(repr(v))) for k, v in spec), dtypes))

    def _wrap(self, cls: type) -> None:
        original = cls.run
        recorder = self

        def run(jit, *args, **kwargs):
            if recorder._paused:  # another hook sits above ours: pass straight through
                return original(jit, *args, **kwargs)
            recorder._count(jit, args, kwargs)
            if not recorder.timed:
                return original(jit, *args, **kwargs)
            start = _Mark(recorder.cuda)
            out = original(jit, *args, **kwargs)
            recorder.spans.append((recorder._kernel(jit)[0], start, _Mark(recorder.cuda)))
            return out

        self._saved.append((cls, original, run))
        cls.run = run

    @contextlib.contextmanager
    def paused(self):
        """Nothing recorded inside, at no cost per launch: the hook is taken out of every class it
        wraps (where another hook sits above it, it passes straight through instead)."""
        if self._paused or not self._saved:
            yield self
            return
        self._paused = True
        swapped = []
        for cls, original, ours in self._saved:
            if cls.run is ours:
                cls.run = original
                swapped.append((cls, ours))
        try:
            yield self
        finally:
            for cls, ours in reversed(swapped):
                cls.run = ours
            self._paused = False

    def __enter__(self) -> LaunchRecorder:
        for cls in _jit_classes():
            self._wrap(cls)
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            for cls, original, _ in reversed(self._saved):
                cls.run = original
            self._saved.clear()
            if self.cuda:
                torch.cuda.synchronize()

    def per_kernel(self, calls: int = 1) -> dict[str, dict]:
        """``{kernel: {"ms", "launches"}}`` per call of the recorded callable, slowest first."""
        ms: dict[str, float] = defaultdict(float)
        launches: dict[str, int] = defaultdict(int)
        for name, start, end in self.spans:
            ms[name] += start.ms_to(end) / calls
            launches[name] += 1
        order = sorted(ms, key=ms.get, reverse=True)
        return {k: {"ms": ms[k], "launches": launches[k] / calls} for k in order}


def breakdown(fn, cuda: bool, reps: int = 5, counter: LaunchRecorder | None = None) -> dict[str, dict]:
    """Per-kernel ms of one call of ``fn`` (after one unrecorded call: compiles and autotuning).

    ``counter`` (a variant counter active around this call) counts that first call's variants and is
    paused while the recorded calls run, so that their spans hold no time of its hook.
    """
    fn()
    with counter.paused() if counter is not None else contextlib.nullcontext():
        with LaunchRecorder(cuda) as rec:
            for _ in range(reps):
                fn()
    return rec.per_kernel(calls=reps)

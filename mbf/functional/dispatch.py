"""``backend="auto"`` on CUDA: the fastest LoRA path for this GPU and shape, measured once, then cached.

Candidates are ``lora_linear`` backends: ``"triton"`` (the fused kernels: base GEMM and LoRA term in
one Triton kernel), ``"torch"`` (cuBLAS GEMMs with the LoRA term as the GEMM's addend: about what
PEFT costs), ``"hybrid"`` (``HYBRID``: cuBLAS base GEMMs with the addend + Triton low-rank kernels)
and whatever ``register_candidate`` adds. On the first call of a case the dispatch times one forward
(+ backward when a gradient is wanted) of each candidate on inputs of that shape drawn from a private
generator (CUDA events, after one untimed call that compiles and autotunes), keeps the fastest, and
stores the choice in memory and in ``cache_dir()/dispatch/<GPU>-<versions hash>.json``.

A case is keyed by (GPU name, input dtype, adapter dtype, dropout on/off, training or inference,
rank, in features, out features, tokens rounded up to a power of two): ``case_key``. The file is
keyed by GPU name and the torch / triton / mbf versions: an upgrade measures again. It is written
atomically and merged with what another process wrote meanwhile; a file that does not parse is
ignored with a warning and rewritten.

Precedence, first match wins: an explicit ``backend=`` (never reaches here); ``$MBF_BACKEND`` (a
backend name); ``torch.use_deterministic_algorithms(True)``: ``DETERMINISTIC_CHOICE``; under
``torch.compile`` tracing or CUDA-graph capture (no timing possible): ``TRACE_CHOICE``; the cache;
a measurement. The torch path is kept unless another candidate is faster by more than ``MARGIN``,
so ``auto`` is never measurably slower than it (the promise ``bench/run_gpu.sh`` measures). A
candidate that raises is skipped, with a warning and a note in the cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mbf.config import BACKENDS
from mbf.functional._backend import kernel
from mbf.io import atomic_write_json, cache_dir

__all__ = [
    "DETERMINISTIC_CHOICE",
    "ENV",
    "HYBRID",
    "MARGIN",
    "TRACE_CHOICE",
    "Dispatcher",
    "auto_backend",
    "candidates",
    "case_key",
    "cuda_event_timer",
    "default_dispatcher",
    "register_candidate",
    "use_dispatcher",
]

ENV = "MBF_BACKEND"  # a backend name that replaces auto's measured choice on CUDA
# Deterministic mode pins the torch path: cuBLAS GEMMs give the same bits run to run, while the fused
# kernels add dB's partial sums with atomics, whose order (hence rounding) varies.
DETERMINISTIC_CHOICE = "torch"
TRACE_CHOICE = "triton"  # under torch.compile / graph capture nothing can be timed: the fused op
MARGIN = 0.02  # another candidate replaces the torch path only when faster by more than this fraction
HYBRID = "hybrid"  # the hybrid path (cuBLAS base GEMMs + Triton low-rank kernels)

Timer = Callable[[Callable[[], object]], float]  # ms of one call of the thunk


@dataclass(frozen=True)
class Case:
    """What decides the fastest path (the key's fields; see ``case_key``)."""

    device: str  # the GPU's name
    dtype: str  # x's dtype (the base GEMMs')
    adapter_dtype: str  # A's dtype (the LoRA branch's)
    dropout: bool  # LoRA dropout on
    train: bool  # a gradient is wanted: forward + backward are timed, else the forward alone
    r: int
    K: int  # in features
    N: int  # out features
    M: int  # tokens, rounded up to a power of two (the shape bucket)


def _supports_fused(case: Case) -> bool:
    """The fused kernels hold r in one register tile: above ``MAX_RANK`` "triton" runs the torch path."""
    try:
        return case.r <= kernel("lora_op", "MAX_RANK")
    except NotImplementedError:  # no triton here
        return False


# name -> whether it runs a case; the order is the order of measurement (torch first: the reference)
# (the hybrid path's Triton low-rank kernels share the fused kernels' rank limit: above it, "hybrid" runs
# the torch path's low-rank GEMMs too, which is the torch candidate itself)
_CANDIDATES: dict[str, Callable[[Case], bool]] = {
    "torch": lambda case: True,
    "triton": _supports_fused,
    HYBRID: _supports_fused,
}


def register_candidate(name: str, supports: Callable[[Case], bool] = lambda case: True) -> None:
    """Add (or re-limit) a ``lora_linear`` backend for ``auto`` to measure.

    Raises:
        ValueError: when ``lora_linear`` does not know ``name`` as a backend (``mbf.config.BACKENDS``).
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"dispatch candidate {name!r} must be a lora_linear backend: one of {BACKENDS[1:]}")
    _CANDIDATES[name] = supports


def candidates(case: Case) -> list[str]:
    """The registered backends that run ``case``, in measurement order."""
    return [name for name, supports in _CANDIDATES.items() if supports(case)]


def _bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def case_key(case: Case) -> str:
    """``"NVIDIA H200|bfloat16|float32|p0|train|r16|4096x14336|M8192"``: one cache entry's name."""
    mode = "train" if case.train else "infer"
    return (
        f"{case.device}|{case.dtype}|{case.adapter_dtype}|p{int(case.dropout)}|{mode}|r{case.r}|"
        f"{case.K}x{case.N}|M{case.M}"
    )


def cuda_event_timer(fn: Callable[[], object], reps: int = 5) -> float:
    """Median ms of ``reps`` calls of ``fn`` after one untimed call (compile, autotune): CUDA events
    where CUDA is available, else a wall clock (the CPU dry run of the GPU script)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
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


def _versions_tag(device: str) -> str:
    parts = [device, torch.__version__]
    for dist in ("triton", "mbf-lora"):
        try:
            from importlib import metadata

            parts.append(metadata.version(dist))
        except Exception:  # noqa: BLE001 - a missing distribution is part of the tag, not an error
            parts.append("-")
    return "|".join(parts)


@dataclass
class Dispatcher:
    """Choices per case, in memory and on disk; ``timer`` and ``path`` are injectable (tests).

    Args:
        timer: ms of one call of a thunk (default: ``cuda_event_timer``).
        folder: where the cache files go (default ``cache_dir()/dispatch``); None with
            ``persist=False``: memory only.
        persist: write and read the disk cache.
    """

    timer: Timer = cuda_event_timer
    folder: Path | None = None
    persist: bool = True
    choices: dict[str, dict] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: set = field(default_factory=set, repr=False)

    def path(self, device: str) -> Path:
        """The cache file of ``device`` under the installed versions."""
        tag = _versions_tag(device)
        digest = hashlib.sha256(tag.encode()).hexdigest()[:12]
        name = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
        return (self.folder or cache_dir() / "dispatch") / f"{name}-{digest}.json"

    def _read(self, device: str) -> dict[str, dict]:
        path = self.path(device)
        if not self.persist or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if data.get("tag") != _versions_tag(device) or not isinstance(data.get("choices"), dict):
                raise ValueError("not a dispatch cache of this GPU and these versions")
            # an entry naming a backend this install does not have (a removed path) is measured again
            choices = data["choices"].items()
            return {k: v for k, v in choices if isinstance(v, dict) and v.get("backend") in BACKENDS[1:]}
        except (OSError, ValueError, AttributeError) as err:
            warnings.warn(f"{path}: dispatch cache ignored ({err}); it will be measured again", stacklevel=3)
            return {}

    def _write(self, device: str) -> None:
        if not self.persist:
            return
        path = self.path(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller was warned when it was read
            merged = {
                **self._read(device),
                **{k: v for k, v in self.choices.items() if v["device"] == device},
            }
        try:
            atomic_write_json({"tag": _versions_tag(device), "choices": merged}, path)
        except OSError as err:
            warnings.warn(
                f"{path}: dispatch cache not written ({err}); the choice holds in memory", stacklevel=3
            )

    def choose(self, case: Case, bench: Callable[[str], Callable[[], object]]) -> str:
        """The backend for ``case``: from memory, else from disk, else measured (``bench(name)`` gives
        a thunk running that backend once on inputs of the case's shape) and saved."""
        key = case_key(case)
        with self._lock:
            if key not in self.choices and case.device not in self._loaded:
                self._loaded.add(case.device)
                self.choices.update(
                    {k: v for k, v in self._read(case.device).items() if k not in self.choices}
                )
            if key in self.choices:
                return self.choices[key]["backend"]
            entry = self._measure(case, bench)
            self.choices[key] = entry
            self._write(case.device)
            return entry["backend"]

    def _measure(self, case: Case, bench: Callable[[str], Callable[[], object]]) -> dict:
        ms: dict[str, float] = {}
        notes: dict[str, str] = {}
        for name in candidates(case):
            try:
                ms[name] = float(self.timer(bench(name)))
            except Exception as err:  # noqa: BLE001 - a candidate that fails here is not chosen
                notes[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                warnings.warn(
                    f"dispatch {case_key(case)}: candidate {name!r} skipped ({notes[name]})", stacklevel=4
                )
        best = min(ms, key=ms.get) if ms else "torch"
        if "torch" in ms and ms["torch"] <= ms[best] * (1.0 + MARGIN):
            best = "torch"  # within the margin: keep the cuBLAS path (the promise: never slower than it)
        return {"backend": best, "ms": ms, "notes": notes, "device": case.device}


_DEFAULT: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher (created on first use: no work at import)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Dispatcher()
    return _DEFAULT


def use_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Make ``dispatcher`` the process's (None: a fresh default on next use); e.g. a memory-only one,
    or one with another timer (the GPU script's dry run)."""
    global _DEFAULT
    _DEFAULT = dispatcher


def _env_choice() -> str | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if value not in BACKENDS or value == "auto":
        raise ValueError(f"${ENV}={value!r} must be one of {', '.join(BACKENDS[1:])} (or unset)")
    return value


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def auto_backend(x, weight, bias, A, B, scaling, merged_B, lam, dropout, *, run, dispatcher=None) -> str:
    """``backend="auto"``'s choice for a dense LoRA linear on x's device (see the module docstring).

    Args:
        x, weight, bias, A, B, scaling, merged_B, lam, dropout: ``lora_linear``'s arguments.
        run: ``lora_linear`` itself (called with an explicit ``backend=`` on fresh inputs to time it).
        dispatcher: default: ``default_dispatcher()``.

    Raises:
        ValueError: ``$MBF_BACKEND`` set to something that is not a backend name.
    """
    env = _env_choice()
    if env is not None:
        return env
    if torch.are_deterministic_algorithms_enabled():
        return DETERMINISTIC_CHOICE
    if _tracing():
        return TRACE_CHOICE
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    train = torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else str(x.device)
    case = Case(
        device,
        str(x.dtype)[6:],
        str(A.dtype)[6:],
        dropout > 0.0,
        train,
        A.shape[0],
        K,
        weight.shape[0],
        _bucket(M),
    )

    def bench(name: str) -> Callable[[], None]:
        gen = torch.Generator(x.device).manual_seed(0)  # the caller's random streams stay untouched
        xs = torch.randn(case.M, K, generator=gen, device=x.device, dtype=x.dtype).requires_grad_(train)
        As, Bs = (t.detach().clone().requires_grad_(train) for t in (A, B))
        dy = torch.randn(case.M, case.N, generator=gen, device=x.device, dtype=x.dtype)

        def once() -> None:
            xs.grad = As.grad = Bs.grad = None  # no gradient accumulation in the timing
            y = run(xs, weight, bias, As, Bs, scaling, merged_B, lam, dropout=dropout, seed=0, backend=name)
            if train:
                y.backward(dy)

        return once

    with torch.enable_grad() if train else torch.no_grad():
        return (dispatcher or default_dispatcher()).choose(case, bench)

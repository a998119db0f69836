"""``backend="auto"``: the fastest LoRA path for this device and shape, measured once, then cached.

Candidates are the route's (``mbf.kernels.route.candidates``): ``lora_linear`` backends ``"torch"``
(cuBLAS GEMMs with the LoRA term as the GEMM's addend: about what PEFT costs), ``"triton"`` (the
fused kernels) and ``"hybrid"`` (``HYBRID``: cuBLAS base GEMMs + Triton low-rank kernels), plus
whatever ``register_candidate`` adds; over an NF4 weight the NF4 paths ``NF4_CANDIDATES`` (torch's
dequantise-then-GEMM, the fused NF4 GEMM, the one-pass dequant + cuBLAS). Dispatch runs on CUDA
tensors, and on CPU tensors when the process's dispatcher says ``cpu=True`` (the device-agnostic
harness CI runs: the same measure → cache → reload → choose path, the Triton candidates under the
interpreter). How a case is timed (in a fresh thread, outside every thread-local context of the
caller's): ``dispatch_timing``; its key and file: ``dispatch_cache``. No lock is held while anything
runs: a thread that meets a case another thread is measuring waits for that result.

Precedence, first match wins: an explicit ``backend=`` (never reaches here); ``$MBF_BACKEND``;
``torch.use_deterministic_algorithms(True)``: ``DETERMINISTIC_CHOICE``; the cache (memory, then
disk); then, by context (``FALLBACK``, the torch path, is never slower than the promise):
- ``torch.compile`` tracing: the cache's choice, else ``FALLBACK`` (nothing can run while tracing;
  a one-line note says to run one eager step first);
- CUDA-graph capture: a choice measured in this process, else ``FALLBACK`` (a choice read from disk
  would autotune its kernels during the capture, which fails);
- inside an autograd backward (a checkpoint's recompute): ``FALLBACK``, and the case is measured at
  the next forward outside a backward (under reentrant checkpointing the forward runs without grad;
  it measures the training case it will need);
- otherwise: measured now.

Several processes (DDP, FSDP) measure each for itself; ``agree()`` hands rank 0's choices to all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mbf.config import BACKENDS
from mbf.functional._backend import kernel
from mbf.functional.dispatch_cache import (
    Case,
    adopt_rank0,
    cache_path,
    case_fields,
    case_key,
    case_of,
    describe,
    kernels_hash,
    log_line,
    read_choices,
    versions_tag,
    write_choices,
)
from mbf.functional.dispatch_cache import _bucket as _bucket  # the tokens' bucket, read by mbf.bench
from mbf.functional.dispatch_timing import (
    MARGIN,
    Timer,
    cuda_event_timer,
    in_fresh_thread,
    is_measuring,
    lora_bench,
    measure,
)
from mbf.io import cache_dir
from mbf.kernels import interpreting, route

__all__ = ["DETERMINISTIC_CHOICE", "ENV", "FALLBACK", "HYBRID", "MARGIN", "NF4_CANDIDATES",
           "TRACE_CHOICE", "Case", "Dispatcher", "agree", "auto_backend", "candidates", "case_key",
           "cuda_event_timer", "default_dispatcher", "dispatches", "kernels_hash",
           "register_candidate", "use_dispatcher"]  # fmt: skip

ENV = "MBF_BACKEND"  # a backend name that replaces auto's measured choice
# Deterministic mode pins the torch path: cuBLAS GEMMs give the same bits run to run, while the fused
# kernels add dB's partial sums with atomics, whose order (hence rounding) varies.
DETERMINISTIC_CHOICE = "torch"
FALLBACK = "torch"  # where nothing can be measured now: the path auto promises never to be slower than
TRACE_CHOICE = FALLBACK  # under torch.compile tracing without a cached choice (kept for old imports)
HYBRID = "hybrid"  # the hybrid path (cuBLAS base GEMMs + Triton low-rank kernels)
NF4_CANDIDATES = route.NF4_PATHS  # over an NF4 weight: torch, or the Triton nf4_path


def _triton_runs(case: Case) -> bool:
    """The Triton candidates run on CUDA, and on the CPU under the interpreter."""
    return case.device != "cpu" or interpreting()


def _routed(name: str) -> Callable[[Case], bool]:
    """Whether the route measures ``name`` for a dense case, with the kernels importable here."""

    def supports(case: Case) -> bool:
        if name not in route.candidates("dense", case.r, _triton_runs(case)):
            return False
        try:
            kernel("lora_op", "__name__")
        except NotImplementedError:  # no triton here
            return False
        return True

    return supports


# name -> whether it runs a case; the order is the order of the first round (torch first: the reference)
_CANDIDATES: dict[str, Callable[[Case], bool]] = {
    "torch": lambda case: True,
    "triton": _routed("triton"),
    HYBRID: _routed(HYBRID),
}


def register_candidate(name: str, supports: Callable[[Case], bool] = lambda case: True) -> None:
    """Add (or re-limit) a ``lora_linear`` backend for ``auto`` to measure over dense weights.

    Raises:
        ValueError: when ``lora_linear`` does not know ``name`` as a backend (``mbf.config.BACKENDS``).
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"dispatch candidate {name!r} must be a lora_linear backend: one of {BACKENDS[1:]}")
    _CANDIDATES[name] = supports


def candidates(case: Case) -> list[str]:
    """The candidates that run ``case``, in the first round's order."""
    if case.base == "nf4":
        return list(route.candidates("nf4", case.r, _triton_runs(case)))
    return [name for name, supports in _CANDIDATES.items() if supports(case)]


def _valid_choice(key: str, backend: object) -> bool:
    names = NF4_CANDIDATES if key.endswith("|nf4") else BACKENDS[1:]
    return isinstance(backend, str) and backend in names


def _versions_tag(device: str) -> str:
    return versions_tag(device, kernels_hash())


@dataclass
class Dispatcher:
    """Choices per case, in memory and on disk; ``timer`` and ``folder`` are injectable (tests).

    Args:
        timer: ms of one call of a thunk, synchronised around it (default: ``cuda_event_timer``).
        folder: where the cache files go (default ``cache_dir()/dispatch``).
        persist: write and read the disk cache (False: memory only).
        rounds: interleaved rounds of timing per candidate (the spread needs several).
        batch_ms: a timed batch of back-to-back calls lasts about this long (``inner`` calls,
            1 ≤ inner ≤ ``max_inner``, sized from one timed call).
        cpu: dispatch CPU tensors too (the device-agnostic harness; the Triton candidates need the
            interpreter there).
        verbose: one line on stderr per measurement (``mbf: chose …``).
    """

    timer: Timer = cuda_event_timer
    folder: Path | None = None
    persist: bool = True
    rounds: int = 7
    batch_ms: float = 5.0
    max_inner: int = 50
    cpu: bool = False
    verbose: bool = True
    choices: dict[str, dict] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: set = field(default_factory=set, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)  # key -> Event while a thread measures it
    _wanted: set = field(default_factory=set, repr=False)  # cases met inside a backward, unmeasured
    _here: set = field(default_factory=set, repr=False)  # keys measured in this process
    _noted: set = field(default_factory=set, repr=False)  # keys whose fallback note was printed

    def __post_init__(self) -> None:
        if self.folder is not None:
            self.folder = Path(self.folder)
        if self.rounds < 1 or self.max_inner < 1:
            got = f"rounds={self.rounds}, max_inner={self.max_inner}"
            raise ValueError(f"Dispatcher: rounds and max_inner must be >= 1, got {got}")

    def path(self, device: str) -> Path:
        """The cache file of ``device`` under the installed versions and kernels."""
        return cache_path(self.folder or cache_dir() / "dispatch", device, _versions_tag(device))

    def _read(self, device: str) -> dict[str, dict]:
        if not self.persist:
            return {}
        return read_choices(self.path(device), _versions_tag(device), device, _valid_choice)

    def _write(self, device: str) -> None:
        if self.persist:
            write_choices(self.path(device), _versions_tag(device), device, self.choices, _valid_choice)

    def _load(self, device: str) -> None:
        """Read ``device``'s file once per process (under the lock)."""
        if device not in self._loaded:
            self._loaded.add(device)
            self.choices.update({k: v for k, v in self._read(device).items() if k not in self.choices})

    def lookup(self, case: Case, *, here_only: bool = False) -> str | None:
        """The cached choice of ``case`` (memory, then disk), or None; nothing is measured.
        ``here_only``: only a choice measured in this process."""
        key = case_key(case)
        with self._lock:
            self._load(case.device)
            entry = self.choices.get(key)
            if entry is None or (here_only and key not in self._here):
                return None
            return entry["backend"]

    def choose(
        self,
        case: Case,
        bench: Callable[[str], Callable[[], object]],
        device: torch.device | None = None,
    ) -> str:
        """The backend for ``case``: from memory, else from disk, else measured (``bench(name)`` gives
        a thunk running that candidate once on inputs of the case's shape) in a fresh thread, and saved.

        No lock is held while a thunk runs. A thread that meets a case another thread is measuring
        waits for it (inside a backward, where waiting could block the autograd engine, it takes
        ``FALLBACK`` instead); a measurement's own thread never measures again (``FALLBACK``)."""
        key = case_key(case)
        with self._lock:
            self._load(case.device)
            if key in self.choices:
                return self.choices[key]["backend"]
            if is_measuring():
                return FALLBACK
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = threading.Event()
        if not owner:
            if _in_backward():
                return FALLBACK
            pending.wait()
            with self._lock:
                entry = self.choices.get(key)
            return entry["backend"] if entry else FALLBACK
        try:
            t0 = time.perf_counter()
            entry = in_fresh_thread(lambda: self._measure(case, bench), device)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            with self._lock:
                self.choices[key] = entry
                self._here.add(key)
                self._wanted.discard(case)
                self._write(case.device)
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.set()
        if self.verbose:
            print(log_line(case, entry), file=sys.stderr, flush=True)
        return entry["backend"]

    def _measure(self, case: Case, bench: Callable[[str], Callable[[], object]]) -> dict:
        """Time every candidate of ``case`` (``dispatch_timing.measure``); the entry to cache."""
        entry = measure(candidates(case), bench, self.timer, rounds=self.rounds, batch_ms=self.batch_ms,
                        max_inner=self.max_inner, fallback=FALLBACK, what=case_key(case))  # fmt: skip
        return {**entry, "device": case.device}

    def want(self, case: Case) -> None:
        """Note a case met where it could not be measured (inside a backward), until it is."""
        with self._lock:
            self._wanted.add(case)

    def wanted(self, case: Case) -> bool:
        """Whether ``case`` was met unmeasured (``want``) and is still not measured."""
        with self._lock:
            return case in self._wanted

    def note_fallback(self, case: Case, why: str) -> None:
        """One line, once per case, saying that ``FALLBACK`` runs unmeasured and why."""
        key = case_key(case)
        if key in self._noted:
            return
        self._noted.add(key)
        if self.verbose:
            print(f"mbf: {describe(case)}: torch path, not measured ({why})", file=sys.stderr, flush=True)


_DEFAULT: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher (created on first use: no work at import)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Dispatcher()
    return _DEFAULT


def use_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Make ``dispatcher`` the process's (None: a fresh default on next use); e.g. a memory-only one,
    one with another timer (the GPU script's dry run), or ``Dispatcher(cpu=True)``: the harness."""
    global _DEFAULT
    _DEFAULT = dispatcher


def dispatches(x: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` measures for ``x``: CUDA tensors, and CPU tensors under a harness
    dispatcher (``Dispatcher(cpu=True)``)."""
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and _DEFAULT is not None and _DEFAULT.cpu


def _env_choice() -> str | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if value not in BACKENDS or value == "auto":
        raise ValueError(f"${ENV}={value!r} must be one of {', '.join(BACKENDS[1:])} (or unset)")
    return value


def _in_backward() -> bool:
    """Inside an autograd engine's backward (a hook, a checkpoint's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@torch._dynamo.assume_constant_result
def _traced_choice(device_type: str, device_index: int, fields: tuple) -> str:
    """Under torch.compile tracing: the cached choice, else ``FALLBACK`` (run eagerly by dynamo, its
    answer becomes a constant of the graph). Takes plain values only: the device's name is read here,
    outside the trace."""
    d = default_dispatcher()
    case = case_of(_device_name(torch.device(device_type, device_index)), fields)
    chosen = d.lookup(case)
    if chosen is None:
        d.note_fallback(case, "first seen under torch.compile; run one eager step first to measure it")
        return FALLBACK
    if chosen != "torch":  # the trace then finds the kernel modules imported (an import breaks the graph)
        for module in ("lora_op", "lora_lowrank", "nf4"):
            kernel(module, "__name__")
    return chosen


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def auto_backend(
    x, weight, bias, A, B, scaling, merged_B, lam, dropout, *, run, dispatcher=None, nf4=None
) -> str:
    """``backend="auto"``'s choice for a LoRA linear on x's device (see the module docstring): a
    ``lora_linear`` backend over a dense weight, one of ``NF4_CANDIDATES`` over an NF4 one.

    Args:
        x, weight, bias, A, B, scaling, merged_B, lam, dropout: ``lora_linear``'s arguments.
        run: ``lora_linear`` itself (called with an explicit ``backend=`` on fresh inputs to time it).
        dispatcher: default: ``default_dispatcher()``.
        nf4: whether ``weight`` is an ``NF4Weight`` (None: look).

    Raises:
        ValueError: ``$MBF_BACKEND`` set to something that is not a backend name.
    """
    env = _env_choice()
    if env is not None:
        return env
    if torch.are_deterministic_algorithms_enabled():
        return DETERMINISTIC_CHOICE
    if nf4 is None:
        from mbf.nf4 import NF4Weight  # here: mbf.nf4 imports mbf.functional

        nf4 = isinstance(weight, NF4Weight)
    grad_wanted = A.requires_grad or B.requires_grad or x.requires_grad
    train = torch.is_grad_enabled() and grad_wanted
    fields = case_fields(x, weight, A, dropout, train, nf4)
    if torch.compiler.is_compiling():
        return _traced_choice(x.device.type, x.device.index or 0, fields)
    d = dispatcher or default_dispatcher()
    case = case_of(_device_name(x.device), fields)
    if _capturing():
        chosen = d.lookup(case, here_only=True)
        if chosen is None:
            d.note_fallback(case, "first seen during CUDA-graph capture; run one step before capturing")
        return chosen or FALLBACK
    if _in_backward():
        chosen = d.lookup(case)
        if chosen is None:
            d.want(case)  # measured at the next forward outside a backward
        return chosen or FALLBACK

    args = (x, weight, bias, A, B, scaling, merged_B, lam, dropout)
    bench_of = lambda c: lora_bench(run, args, nf4, c.M, c.N, c.train)  # noqa: E731

    if not train and grad_wanted:
        # a forward without grad of trainable adapters (reentrant checkpointing's first pass): the
        # training case its recompute met inside the backward is measured here
        twin = dataclasses.replace(case, train=True)
        if d.wanted(twin):
            d.choose(twin, bench_of(twin), x.device)
    return d.choose(case, bench_of(case), x.device)


def agree(group=None) -> int:
    """Every rank adopts rank 0's choices (a collective: call it on every rank at the same point, e.g.
    after the first training step, when each rank has measured its cases). Ranks measure each for
    itself and can choose differently (the paths compute the same function to rounding; only speed
    differs). Returns how many of this rank's choices changed. A case rank 0 has not met keeps this
    rank's own choice."""
    d = default_dispatcher()
    return adopt_rank0(d.choices, d._lock, group)

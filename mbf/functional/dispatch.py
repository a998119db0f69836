"""``backend="auto"``: the fastest LoRA path for this device and shape, measured once, then cached.

Candidates are ``lora_linear`` backends: ``"torch"`` (cuBLAS GEMMs with the LoRA term as the GEMM's
addend: about what PEFT costs), ``"triton"`` (the fused kernels), ``"hybrid"`` (``HYBRID``: cuBLAS
base GEMMs + Triton low-rank kernels) and whatever ``register_candidate`` adds; over an NF4 weight the
candidates are the NF4 paths ``NF4_CANDIDATES`` (torch's dequantise-then-GEMM, the fused NF4 GEMM,
the one-pass dequant + cuBLAS). Dispatch runs on CUDA tensors, and on CPU tensors when the process's
dispatcher says ``cpu=True`` (the device-agnostic harness CI runs: the same measure → cache → reload
→ choose path, the Triton candidates under the interpreter).

Measurement (``Dispatcher._measure``), on the first call of a case: each candidate runs once untimed
(compile, autotune) and once timed (to size a batch); then ``rounds`` rounds, candidates interleaved
in a rotating order, each timed as ``inner`` back-to-back calls with one synchronisation around the
batch, not each call (host work overlaps the device's, as in training). A candidate's time is the
median per call; its spread the half inter-quartile range over the median. The torch path is kept
unless another candidate is faster by more than the margin ``max(MARGIN, spread_torch +
spread_best)``: the margin comes from the measured noise, and both are recorded with the choice.

Where it runs: in a fresh thread that the caller joins. Grad mode, inference mode, autocast,
saved-tensor hooks (activation checkpointing, ``save_on_cpu``) and dispatch modes are thread-local,
so the measurement sees none of the caller's: a checkpointed layer's measurement cannot fire the
checkpoint's hooks (before, its backward unpacked into the checkpoint, whose recompute called
``auto`` again and waited forever on the lock the measurement held). No lock is held while anything
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

A case is keyed by (device name, input dtype, adapter dtype, dropout on/off, training or inference,
rank, in features, out features, tokens rounded up to a power of two, dense or NF4 base):
``case_key``. The file ``cache_dir()/dispatch/<device>-<hash>.json`` is keyed by the device and the
torch / triton / mbf versions and a hash of the kernel sources (``kernels_hash``): an upgrade or a
kernel edit measures again. It is written atomically and merged with what another process wrote
meanwhile; a file or entry that does not parse is ignored with a warning naming the file.

Several processes (DDP, FSDP): each rank measures for itself, so ranks can choose differently (the
paths compute the same function to rounding; only speed differs). ``agree()``, called by every rank
at the same point (after the first step), hands rank 0's choices to all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import sys
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
from mbf.kernels import interpreting

__all__ = [
    "DETERMINISTIC_CHOICE",
    "ENV",
    "FALLBACK",
    "HYBRID",
    "MARGIN",
    "NF4_CANDIDATES",
    "TRACE_CHOICE",
    "Case",
    "Dispatcher",
    "agree",
    "auto_backend",
    "candidates",
    "case_key",
    "cuda_event_timer",
    "default_dispatcher",
    "dispatches",
    "kernels_hash",
    "register_candidate",
    "use_dispatcher",
]

ENV = "MBF_BACKEND"  # a backend name that replaces auto's measured choice
# Deterministic mode pins the torch path: cuBLAS GEMMs give the same bits run to run, while the fused
# kernels add dB's partial sums with atomics, whose order (hence rounding) varies.
DETERMINISTIC_CHOICE = "torch"
FALLBACK = "torch"  # where nothing can be measured now: the path auto promises never to be slower than
TRACE_CHOICE = FALLBACK  # under torch.compile tracing without a cached choice (kept for old imports)
MARGIN = 0.02  # the least fraction by which another candidate must beat the torch path to replace it
HYBRID = "hybrid"  # the hybrid path (cuBLAS base GEMMs + Triton low-rank kernels)
NF4_CANDIDATES = ("torch", "fused", "dequant")  # over an NF4 weight: torch, or the Triton nf4_path

# ms of one call of the thunk, synchronised around it; a thunk's ``candidate`` attribute names what it runs
Timer = Callable[[Callable[[], object]], float]


@dataclass(frozen=True)
class Case:
    """What decides the fastest path (the key's fields; see ``case_key``)."""

    device: str  # the GPU's name, or "cpu"
    dtype: str  # x's dtype (the base GEMMs')
    adapter_dtype: str  # A's dtype (the LoRA branch's)
    dropout: bool  # LoRA dropout on
    train: bool  # a gradient is wanted: forward + backward are timed, else the forward alone
    r: int
    K: int  # in features
    N: int  # out features
    M: int  # tokens, rounded up to a power of two (the shape bucket)
    base: str = "dense"  # "dense" or "nf4" (then the candidates are NF4_CANDIDATES)


def _triton_runs(case: Case) -> bool:
    """The Triton candidates run on CUDA, and on the CPU under the interpreter."""
    return case.device != "cpu" or interpreting()


def _supports_fused(case: Case) -> bool:
    """The fused kernels hold r in one register tile: above ``MAX_RANK`` "triton" runs the torch path."""
    if not _triton_runs(case):
        return False
    try:
        return case.r <= kernel("lora_op", "MAX_RANK")
    except NotImplementedError:  # no triton here
        return False


# name -> whether it runs a case; the order is the order of the first round (torch first: the reference)
# (the hybrid path's Triton low-rank kernels share the fused kernels' rank limit: above it, "hybrid" runs
# the torch path's low-rank GEMMs too, which is the torch candidate itself)
_CANDIDATES: dict[str, Callable[[Case], bool]] = {
    "torch": lambda case: True,
    "triton": _supports_fused,
    HYBRID: _supports_fused,
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
        return ["torch", *(p for p in NF4_CANDIDATES[1:] if _triton_runs(case))]
    return [name for name, supports in _CANDIDATES.items() if supports(case)]


def _valid_choice(key: str, backend: object) -> bool:
    names = NF4_CANDIDATES if key.endswith("|nf4") else BACKENDS[1:]
    return isinstance(backend, str) and backend in names


def _bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def case_key(case: Case) -> str:
    """``"NVIDIA H200|bfloat16|float32|p0|train|r16|4096x14336|M8192"`` (``|nf4`` appended over an NF4
    base): one cache entry's name."""
    mode = "train" if case.train else "infer"
    key = (
        f"{case.device}|{case.dtype}|{case.adapter_dtype}|p{int(case.dropout)}|{mode}|r{case.r}|"
        f"{case.K}x{case.N}|M{case.M}"
    )
    return key + ("|nf4" if case.base == "nf4" else "")


def _describe(case: Case) -> str:
    """``4096→14336 r16 bfloat16 M≤8192 train`` for the one-line log."""
    mode = "train" if case.train else "infer"
    base = " nf4" if case.base == "nf4" else ""
    drop = " dropout" if case.dropout else ""
    return f"{case.K}→{case.N}{base} r{case.r} {case.dtype} M≤{case.M} {mode}{drop}"


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


@functools.lru_cache(maxsize=1)
def kernels_hash() -> str:
    """sha256 (12 hex digits) of the kernel sources and their configs (``mbf.kernels``' files) and of
    the Python paths they are measured through (``mbf.functional``): an edit to any of them measures
    again instead of trusting a choice made for other code."""
    import importlib.util

    digest = hashlib.sha256()
    folders = []
    for pkg in ("mbf.kernels", "mbf.functional"):
        spec = importlib.util.find_spec(pkg)
        folders += list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _versions_tag(device: str) -> str:
    parts = [device, torch.__version__]
    for dist in ("triton", "mbf-lora"):
        try:
            from importlib import metadata

            parts.append(metadata.version(dist))
        except Exception:  # noqa: BLE001 - a missing distribution is part of the tag, not an error
            parts.append("-")
    parts.append(f"kernels {kernels_hash()}")
    return "|".join(parts)


_local = threading.local()  # .measuring: this thread is a measurement's


def _in_backward() -> bool:
    """Inside an autograd engine's backward (a hook, a checkpoint's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _in_fresh_thread(fn: Callable[[], dict], device: torch.device | None) -> dict:
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
            if not isinstance(data, dict) or data.get("tag") != _versions_tag(device):
                raise ValueError("not a dispatch cache of this device, these versions and kernels")
            if not isinstance(data.get("choices"), dict):
                raise ValueError("no 'choices' object")
        except (OSError, ValueError, RecursionError) as err:
            warnings.warn(f"{path}: dispatch cache ignored ({err}); it will be measured again", stacklevel=3)
            return {}
        kept = {}
        for key, entry in data["choices"].items():
            # an entry naming a backend this install lacks (a removed path), or not this device's, or
            # not an object, is measured again
            if isinstance(entry, dict) and _valid_choice(key, entry.get("backend")):
                kept[key] = {**entry, "device": device}
            else:
                warnings.warn(f"{path}: entry {key!r} ignored (not a choice of this install)", stacklevel=3)
        return kept

    def _write(self, device: str) -> None:
        if not self.persist:
            return
        path = self.path(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller was warned when it was read
            merged = {
                **self._read(device),
                **{k: v for k, v in self.choices.items() if v.get("device") == device},
            }
        try:
            atomic_write_json({"tag": _versions_tag(device), "choices": merged}, path)
        except OSError as err:
            warnings.warn(
                f"{path}: dispatch cache not written ({err}); the choice holds in memory", stacklevel=3
            )

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
            if getattr(_local, "measuring", False):
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
            entry = _in_fresh_thread(lambda: self._measure(case, bench), device)
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
            print(_log_line(case, entry), file=sys.stderr, flush=True)
        return entry["backend"]

    def _measure(self, case: Case, bench: Callable[[str], Callable[[], object]]) -> dict:
        """Time every candidate of ``case`` (see the module docstring); the entry to cache."""
        notes: dict[str, str] = {}
        thunks: dict[str, Callable[[], object]] = {}
        single: dict[str, float] = {}
        for name in candidates(case):
            try:
                once = bench(name)
                _label(once, name)
                once()  # compile and autotune, untimed
                single[name] = float(self.timer(once))
                thunks[name] = once
            except Exception as err:  # noqa: BLE001 - a candidate that fails here is not chosen
                notes[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                warnings.warn(
                    f"dispatch {case_key(case)}: candidate {name!r} skipped ({notes[name]})", stacklevel=5
                )
        if not thunks:
            return {"backend": FALLBACK, "ms": {}, "spread": {}, "margin": MARGIN, "notes": notes,
                    "device": case.device, "inner": 0, "rounds": 0}  # fmt: skip
        fastest = max(min(single.values()), 1e-6)
        inner = max(1, min(self.max_inner, math.ceil(self.batch_ms / fastest)))
        names = list(thunks)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for rnd in range(self.rounds):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:  # interleaved, each first in turn

                def batch(once=thunks[name]):
                    result = None
                    for _ in range(inner):
                        result = once()
                    return result

                _label(batch, name)
                samples[name].append(float(self.timer(batch)) / inner)
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
            "rounds": self.rounds,
            "notes": notes,
            "device": case.device,
        }

    def note_fallback(self, case: Case, why: str) -> None:
        """One line, once per case, saying that ``FALLBACK`` runs unmeasured and why."""
        key = case_key(case)
        if key in self._noted:
            return
        self._noted.add(key)
        if self.verbose:
            print(f"mbf: {_describe(case)}: torch path, not measured ({why})", file=sys.stderr, flush=True)


def _log_line(case: Case, entry: dict) -> str:
    times = ", ".join(f"{k} {v:.3g} ms" for k, v in entry["ms"].items())
    skipped = f"; skipped {', '.join(entry['notes'])}" if entry["notes"] else ""
    return (
        f"mbf: chose {entry['backend']} for {_describe(case)} in {entry.get('seconds', 0):.1f} s "
        f"({times}; margin {100 * entry['margin']:.1f} %{skipped})"
    )


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


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@torch._dynamo.assume_constant_result
def _traced_choice(device_type: str, device_index: int, fields: tuple) -> str:
    """Under torch.compile tracing: the cached choice, else ``FALLBACK`` (run eagerly by dynamo, its
    answer becomes a constant of the graph). Takes plain values only: the device's name is read here,
    outside the trace."""
    d = default_dispatcher()
    dtype, adapter_dtype, dropout, train, r, K, N, M, base = fields
    name = _device_name(torch.device(device_type, device_index))
    case = Case(name, dtype, adapter_dtype, dropout, train, r, K, N, _bucket(M), base)
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
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    grad_wanted = A.requires_grad or B.requires_grad or x.requires_grad
    train = torch.is_grad_enabled() and grad_wanted
    fields = (
        str(x.dtype).removeprefix("torch."),
        str(A.dtype).removeprefix("torch."),
        dropout > 0.0,
        train,
        int(A.shape[0]),
        int(K),
        int(weight.shape[0]),
        int(M),
        "nf4" if nf4 else "dense",
    )
    if torch.compiler.is_compiling():
        return _traced_choice(x.device.type, x.device.index or 0, fields)
    d = dispatcher or default_dispatcher()
    dtype, adapter_dtype, drop, train, r, K, N, M, base = fields
    case = Case(_device_name(x.device), dtype, adapter_dtype, drop, train, r, K, N, _bucket(M), base)
    if _capturing():
        chosen = d.lookup(case, here_only=True)
        if chosen is None:
            d.note_fallback(case, "first seen during CUDA-graph capture; run one step before capturing")
        return chosen or FALLBACK
    if _in_backward():
        chosen = d.lookup(case)
        if chosen is None:
            d._wanted.add(case)  # measured at the next forward outside a backward
        return chosen or FALLBACK

    def bench_of(c: Case) -> Callable[[str], Callable[[], None]]:
        def bench(name: str) -> Callable[[], None]:
            gen = torch.Generator(x.device).manual_seed(0)  # the caller's random streams stay untouched
            xs = torch.randn(c.M, c.K, generator=gen, device=x.device, dtype=x.dtype)
            xs.requires_grad_(c.train)
            As, Bs = (t.detach().clone().requires_grad_(c.train) for t in (A, B))
            dy = torch.randn(c.M, c.N, generator=gen, device=x.device, dtype=x.dtype)
            if nf4:
                kw = {"backend": "torch"} if name == "torch" else {"backend": "triton", "nf4_path": name}
            else:
                kw = {"backend": name}

            def once() -> None:
                xs.grad = As.grad = Bs.grad = None  # no gradient accumulation in the timing
                with torch.enable_grad() if c.train else torch.no_grad():
                    y = run(xs, weight, bias, As, Bs, scaling, merged_B, lam, dropout=dropout, seed=0, **kw)
                    if c.train:
                        y.backward(dy)

            return once

        return bench

    if not train and grad_wanted:
        # a forward without grad of trainable adapters (reentrant checkpointing's first pass): the
        # training case its recompute met inside the backward is measured here
        twin = dataclasses.replace(case, train=True)
        if twin in d._wanted:
            d.choose(twin, bench_of(twin), x.device)
    return d.choose(case, bench_of(case), x.device)


def agree(group=None) -> int:
    """Every rank adopts rank 0's choices (a collective: call it on every rank at the same point, e.g.
    after the first training step, when each rank has measured its cases). Returns how many of this
    rank's choices changed. A case rank 0 has not met keeps this rank's own choice."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    d = default_dispatcher()
    with d._lock:
        mine = {k: dict(v) for k, v in d.choices.items()}
    box = [mine]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    changed = 0
    with d._lock:
        for key, entry in box[0].items():
            if key not in d.choices or d.choices[key]["backend"] != entry["backend"]:
                changed += key in d.choices
                d.choices[key] = {**entry, "from_rank0": True}
    return changed

"""``--dtype auto`` on a CPU: the base dtype this CPU runs the model's matrix products fastest in,
measured at first use, then cached on disk. No CPU flag or vendor name decides it.

Why measured: AVX-512-BF16 alone says nothing about the speed. On a 2-core AMD EPYC with it a
SmolLM2 training step was 1.3-1.4x faster in bfloat16; on a 2-core Xeon with the same flag (no AMX)
it was 1.38x *slower* (float32 2,230 ms, bfloat16 3,084 ms).

The probe, for a Llama (``shapes`` are its q/k/v/o/gate/up/down, ``(in_features, out_features)``;
default SmolLM2-135M's): one decoder layer's forward and backward (``LayerProbe``: RMSNorm, the seven
projections with mbf's LoRA on q and v in fp32, causal attention, SwiGLU, residuals) on ``TOKENS``
tokens (4 x 128, the ``mbf`` command's batch), in each candidate dtype: float32, bfloat16 and float16,
whichever torch runs on this CPU. A layer, not only its GEMMs: on this project's EPYC the linears alone
were 3.6-4.4x faster in bfloat16 while a whole step was 2.7x (loaded machine), and on the Xeon above
the step was slower, so what is timed is what a step does. For other shapes, each linear's forward
GEMM ``x @ W.T`` and input-gradient GEMM ``dy @ W``. One warm-up round, then
``ROUNDS`` rounds with the candidates interleaved (the order rotated each round; no round starts once
``BUDGET_MS`` of probing is spent); a candidate's time is the median of its round totals. A candidate
more than ``DROP`` times slower than float32 over the same probes (plus ``SLACK_MS``, a first use's
one-time costs; emulated 16-bit arithmetic, e.g. float16 without AVX-512-FP16, is 15x) is dropped at
once, so the probe stays around a second on 2 cores. ``auto`` is float32 unless a 16-bit dtype is
faster than it by more than ``MARGIN``. Tensors are drawn from a private generator (the caller's
random streams stay untouched); ``mbf bench`` times the whole training step in each dtype the probe
kept, to check it.

The answer, with each dtype's ms, is written to ``$MBF_DTYPE_CACHE`` (default ``cache_dir()/dtype``),
one JSON file per key: the CPU's model name, the number of cores this process may run on, the CPU
capabilities torch sees, the torch and mbf versions, the probe's version, the shapes and the token
count. A change of any measures again. Not torch's current thread count: ``--threads`` and the demo's
side-by-side processes (half the threads each) must load the base in one dtype, so the processes of
a machine share one answer (the record notes the threads it was measured with). A file that does not
parse or does not match its key is ignored with a warning naming it and measured again.
``$MBF_DTYPE_REMEASURE=1`` (or ``cpu_dtype(remeasure=True)``) ignores the disk cache once per process
and key. Under ``torch.compile`` tracing nothing is timed: the answer known in this process, else
float32. Two threads asking at once may both measure; either answer is a measurement, and the file
is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

from mbf.io import atomic_write_json, cache_dir

__all__ = [
    "BUDGET_MS",
    "CANDIDATES",
    "DROP",
    "ENV_FOLDER",
    "ENV_REMEASURE",
    "MARGIN",
    "ROUNDS",
    "SLACK_MS",
    "Shapes",
    "SMOLLM2_SHAPES",
    "TOKENS",
    "DtypeChoice",
    "cache_folder",
    "cache_key",
    "cached_cpu_dtype",
    "cpu_cores",
    "cpu_dtype",
    "cpu_name",
    "forget",
    "llama_shapes",
    "measure",
    "pick",
    "report_to",
    "wall_timer",
]

# SmolLM2-135M (hidden 576, intermediate 1536, 9 heads and 3 KV heads of 64): q, k, v, o, gate, up, down
SMOLLM2_SHAPES: tuple[tuple[int, int], ...] = (
    (576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576),
)  # fmt: skip
TOKENS = 4 * 128  # the `mbf` command's batch: 4 sequences of up to 128 tokens
ROUNDS = 5  # timed rounds after the warm-up; each candidate's time is the median of its rounds
MARGIN = 0.05  # a 16-bit dtype replaces float32 only when faster by more than this fraction
BUDGET_MS = 2000.0  # no timed round starts after this much probing (a large model's linears: fewer rounds)
SLACK_MS = 20.0  # ... plus this: a first use's one-time costs (oneDNN generating its kernels) are ms
DROP = 3.0  # a candidate slower than float32 by more than this factor in a round is not timed further
CANDIDATES = ("float32", "bfloat16", "float16")  # float32 first: the reference the others are held to
PROBE_VERSION = 2  # part of the key: a change of the probe measures again (2: one decoder layer)
ENV_FOLDER = "MBF_DTYPE_CACHE"
ENV_REMEASURE = "MBF_DTYPE_REMEASURE"

Timer = Callable[[Callable[[], object]], float]  # ms of one call of the thunk (a ``Probe``)
Shapes = Sequence[Sequence[int]]  # a model's linears, (in_features, out_features) each


def wall_timer(fn: Callable[[], object]) -> float:
    """ms of one call of ``fn`` on the wall clock (the CPU's GEMMs return when done)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclass(frozen=True)
class Probe:
    """One linear's forward and input-gradient GEMMs in ``dtype`` (a ``Timer`` times one call; a fake
    timer in tests reads ``dtype`` and ``shape`` instead of calling it)."""

    dtype: str
    shape: tuple[int, int]  # (in_features, out_features)
    x: torch.Tensor = field(repr=False)
    weight: torch.Tensor = field(repr=False)
    dy: torch.Tensor = field(repr=False)

    def __call__(self) -> None:
        F.linear(self.x, self.weight)  # the forward
        torch.mm(self.dy, self.weight)  # the backward of a frozen base: the input's gradient only


def _what(shapes) -> str:
    return "one decoder layer" if _is_llama(shapes) else "the model's linears"


@dataclass(frozen=True)
class LayerProbe:
    """One Llama decoder layer's forward + backward in ``dtype`` (``shape`` is ``"layer"``): RMSNorm,
    q/k/v/o with mbf's LoRA (r 8, fp32 adapters, the torch path) on q and v, causal attention over
    heads of 64, SwiGLU, the residuals; gradients to the input and the adapters, as training makes
    them. Everything a step does per layer, not only its GEMMs: a CPU can multiply 16-bit matrices
    fast and still run the rest of a step slower in them."""

    dtype: str
    run: Callable[[], None] = field(repr=False)
    shape: str = "layer"

    def __call__(self) -> None:
        self.run()


def _is_llama(shapes) -> bool:
    """``shapes`` are a Llama layer's q, k, v, o, gate, up, down (``llama_shapes``) with heads of 64."""
    if len(shapes) != 7:
        return False
    (h, q), (h2, kv), (h3, kv2), (q2, h4), (h5, inter), (h6, inter2), (inter3, h7) = shapes
    same = h == h2 == h3 == h4 == h5 == h6 == h7 and kv == kv2 and q == q2 and inter == inter2 == inter3
    return same and q % 64 == 0 and kv % 64 == 0 and (q // 64) % (kv // 64) == 0


def _layer_probe(dtype: str, shapes, tokens: int) -> LayerProbe:
    from mbf.functional import lora_linear  # the LoRA branch as training runs it on a CPU

    (h, q), (_, kv), _, _, (_, inter), _, _ = shapes
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)  # the caller's random streams stay untouched

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=gen) * k**-0.5).to(dt)

    Wq, Wk, Wv, Wo, Wg, Wu, Wd = w(q, h), w(kv, h), w(kv, h), w(h, q), w(inter, h), w(inter, h), w(h, inter)
    adapters = [(torch.randn(8, h, generator=gen) * h**-0.5, torch.randn(n, 8, generator=gen) * 0.01)
                for n in (q, kv)]  # fmt: skip
    adapters = [(A.requires_grad_(), B.requires_grad_()) for A, B in adapters]
    seq = min(tokens, 128)
    x = torch.randn(max(1, tokens // seq), seq, h, generator=gen).to(dt).requires_grad_()
    dy = torch.randn(x.shape, generator=gen).to(dt)
    heads, kv_heads = q // 64, kv // 64

    def rms(v: torch.Tensor) -> torch.Tensor:
        v32 = v.float()
        return (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)

    def split(v: torch.Tensor, n: int) -> torch.Tensor:
        return v.view(*v.shape[:2], n, 64).transpose(1, 2)

    def run() -> None:
        x.grad = None
        for A, B in adapters:
            A.grad = B.grad = None
        with torch.enable_grad():
            a = rms(x)
            (Aq, Bq), (Av, Bv) = adapters
            qs = split(lora_linear(a, Wq, None, Aq, Bq, 2.0, backend="torch"), heads)
            ks = split(F.linear(a, Wk), kv_heads).repeat_interleave(heads // kv_heads, dim=1)
            vs = split(lora_linear(a, Wv, None, Av, Bv, 2.0, backend="torch"), kv_heads)
            vs = vs.repeat_interleave(heads // kv_heads, dim=1)
            att = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(1, 2).flatten(2)
            mid = x + F.linear(att, Wo)
            b = rms(mid)
            out = mid + F.linear(F.silu(F.linear(b, Wg)) * F.linear(b, Wu), Wd)
            out.backward(dy)

    return LayerProbe(dtype, run)


@dataclass(frozen=True)
class DtypeChoice:
    """``auto``'s answer on this CPU and the measurement behind it."""

    dtype: torch.dtype
    ms: dict[str, float]  # the median ms of a probe round, of each candidate measured to the end
    dropped: dict[str, str]  # candidate -> why it was not measured to the end
    key: dict
    path: Path | None  # the cache file (None: not written)
    measured: bool  # measured in this process (False: read from the cache)
    threads: int = 0  # torch's threads while it was measured

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def line(self) -> str:
        """``mbf: --dtype auto chose float32 on <cpu>, 2 cores (float32 95.1 ms, bfloat16 131.0 ms for
        one decoder layer, forward+backward of 512 tokens on 2 threads; cached in <path>)``."""
        times = [f"{d} {ms:,.1f} ms" for d, ms in self.ms.items()]
        times += [f"{d} {why}" for d, why in self.dropped.items()]
        where = f"cached in {self.path}" if self.path is not None else "not cached"
        return (
            f"mbf: --dtype auto chose {self.name} on {self.key['cpu']}, {self.key['cores']} cores "
            f"({', '.join(times)} for {_what(self.key['shapes'])}, forward+backward of {self.key['tokens']} "
            f"tokens on {self.threads} threads; {where})"
        )


def llama_shapes(config: Mapping | object) -> tuple[tuple[int, int], ...]:
    """A Llama's q/k/v/o/gate/up/down ``(in_features, out_features)`` from its config (a ``config.json``
    dict or a transformers config)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    h, inter, heads = int(get("hidden_size")), int(get("intermediate_size")), int(get("num_attention_heads"))
    head_dim = int(get("head_dim", None) or h // heads)
    q, kv = heads * head_dim, int(get("num_key_value_heads", None) or heads) * head_dim
    return ((h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``, else the machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip() or "unknown CPU"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    """The cores this process may run on (its affinity; else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def cache_key(shapes: Shapes = SMOLLM2_SHAPES, tokens: int = TOKENS) -> dict:
    """What the answer depends on; a change of any field measures again."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = sorted(k for k, v in caps.items() if v is True)  # the ISA torch sees (a VM may hide some)
    return {
        "cpu": cpu_name(),
        "cores": cpu_cores(),
        "isa": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12],
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "torch": torch.__version__,
        "mbf": _version("mbf-lora"),
        "probe": PROBE_VERSION,
        "shapes": [[int(a), int(b)] for a, b in shapes],
        "tokens": int(tokens),
    }


def cache_folder() -> Path:
    """``$MBF_DTYPE_CACHE``, else ``cache_dir()/dtype``."""
    return Path(os.environ[ENV_FOLDER]) if os.environ.get(ENV_FOLDER) else cache_dir() / "dtype"


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() else "-" for c in key["cpu"].lower()).strip("-")[:60] or "cpu"
    return cache_folder() / f"{name}-{digest}.json"


def _probes(dtype: str, shapes, tokens: int) -> list[Probe | LayerProbe]:
    """A Llama's shapes: one decoder layer (``LayerProbe``); any others: each linear's GEMMs."""
    if _is_llama(shapes):
        return [_layer_probe(dtype, shapes, tokens)]
    gen = torch.Generator().manual_seed(0)  # the caller's random streams stay untouched
    dt = getattr(torch, dtype)
    out = []
    for k, n in shapes:
        x = torch.randn(tokens, k, generator=gen).to(dt)
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dt)
        dy = torch.randn(tokens, n, generator=gen).to(dt)
        out.append(Probe(dtype, (int(k), int(n)), x, w, dy))
    return out


def measure(
    shapes: Shapes = SMOLLM2_SHAPES,
    tokens: int = TOKENS,
    rounds: int = ROUNDS,
    timer: Timer = wall_timer,
    candidates: Sequence[str] = CANDIDATES,
) -> tuple[dict[str, float], dict[str, str]]:
    """Time the probe in each candidate dtype (see the module docstring).

    Returns:
        ``(ms, dropped)``: the median ms of a round of each candidate measured to the end (float32
        always), and why each other candidate was not (it raised, or was over ``DROP`` x float32).
    """
    assert candidates[0] == "float32", "float32 is the reference: measured first, never dropped"
    probes: dict[str, list[Probe]] = {}
    dropped: dict[str, str] = {}
    with torch.no_grad():
        for name in candidates:
            try:
                if name != "float32":  # can torch multiply in it here at all?
                    one = torch.ones(2, 2, dtype=getattr(torch, name))
                    one @ one
                probes[name] = _probes(name, shapes, tokens)
            except (RuntimeError, TypeError) as err:
                if name == "float32":
                    raise
                probes.pop(name, None)
                dropped[name] = f"not run here ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        totals: dict[str, list[float]] = {name: [] for name in probes}
        ref: list[float] = []  # float32's latest round: its time up to and including each linear
        spent = [0.0]

        def run(name: str) -> float | None:
            total = 0.0
            for i, probe in enumerate(probes[name]):
                ms = float(timer(probe))
                total += ms
                spent[0] += ms
                if name == "float32":
                    ref[i:] = [total]
                elif total > DROP * ref[i] + SLACK_MS:  # linear by linear: an emulated dtype stops early
                    dropped[name] = (
                        f"over {DROP:g}x slower than float32 ({total:,.1f} ms against {ref[i]:,.1f} ms "
                        f"on {i + 1} of the {len(ref)} probes; not timed further)"
                    )
                    del probes[name], totals[name]
                    return None
            return total

        for r in range(rounds + 1):  # round 0: the warm-up (first use of each path), float32 first
            order = list(probes)
            if r > 0:
                shift = (r - 1) % len(order)
                order = order[shift:] + order[:shift]
            for name in order:
                total = run(name)
                if total is not None and r > 0:
                    totals[name].append(total)
            if r > 0 and spent[0] > BUDGET_MS:  # a large model's linears: fewer rounds, a bounded probe
                break
    return {name: statistics.median(t) for name, t in totals.items()}, dropped


def pick(ms: Mapping[str, float], margin: float = MARGIN) -> str:
    """float32 unless the fastest 16-bit candidate beats it by more than ``margin``."""
    others = {d: t for d, t in ms.items() if d != "float32"}
    if not others:
        return "float32"
    best = min(others, key=others.get)
    return best if ms["float32"] > others[best] * (1.0 + margin) else "float32"


_CHOICES: dict[str, DtypeChoice] = {}  # this process's answers, by key


def forget() -> None:
    """Drop this process's answers: the next ``cpu_dtype`` reads the disk cache (or measures) again."""
    _CHOICES.clear()


def _positive(t: object) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


def _read(path: Path, key: dict) -> DtypeChoice | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != key:
            raise ValueError("not the measurement of this CPU, these versions and these shapes")
        ms, dropped, dtype = data.get("ms"), data.get("dropped", {}), data.get("dtype")
        ok_ms = isinstance(ms, dict) and "float32" in ms and set(ms) <= set(CANDIDATES)
        if not ok_ms or not all(_positive(t) for t in ms.values()):
            raise ValueError("its ms are not a positive time for float32 and each measured candidate")
        if dtype not in ms or not isinstance(dropped, dict):
            raise ValueError(f"its dtype {dtype!r} is not one it measured")
        ms = {d: float(t) for d, t in ms.items()}
        dropped = {str(d): str(w) for d, w in dropped.items()}
        threads = data.get("threads") if isinstance(data.get("threads"), int) else 0
        return DtypeChoice(getattr(torch, dtype), ms, dropped, key, path, measured=False, threads=threads)
    except (OSError, ValueError, TypeError) as err:
        warnings.warn(f"{path}: dtype cache ignored ({err}); measuring again", RuntimeWarning, stacklevel=4)
        return None


def cached_cpu_dtype(shapes: Shapes = SMOLLM2_SHAPES, tokens: int = TOKENS) -> DtypeChoice | None:
    """The answer known in this process or on disk, without measuring (None when there is none)."""
    key = cache_key(shapes, tokens)
    mem = json.dumps(key, sort_keys=True)
    if mem in _CHOICES:
        return _CHOICES[mem]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bad file is reported when it is about to be measured again
        return _read(_path(key), key)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


_REPORT: list[Callable[[str], None]] = [_stderr]  # where a fresh measurement's line goes by default


@contextmanager
def report_to(report: Callable[[str], None]):
    """Within the block, a fresh measurement's line goes to ``report`` instead of stderr (the CLI
    prints it after the model loaded, so an error stays the one line it prints)."""
    _REPORT.append(report)
    try:
        yield
    finally:
        _REPORT.remove(report)


def cpu_dtype(
    shapes: Shapes = SMOLLM2_SHAPES,
    *,
    tokens: int = TOKENS,
    timer: Timer | None = None,
    remeasure: bool = False,
    report: Callable[[str], None] | None | str = "default",
) -> DtypeChoice:
    """``auto``'s dtype on this CPU for a model whose linears have ``shapes``: from this process's
    answers, else the disk cache, else measured (``measure``), written to the cache and reported in
    one line (``report``; default: stderr, or where ``report_to`` sends it; None: silent).

    Args:
        shapes: the model's linears, ``(in_features, out_features)`` each (``llama_shapes(config)``).
        tokens: tokens per GEMM.
        timer: ms of one call of a ``Probe`` (default: ``wall_timer``, looked up at the call, so a
            test may replace the module's ``wall_timer``).
        remeasure: ignore the disk cache (also ``$MBF_DTYPE_REMEASURE=1``), once per process and key.
    """
    key = cache_key(shapes, tokens)
    mem = json.dumps(key, sort_keys=True)
    if mem in _CHOICES and not remeasure:
        return _CHOICES[mem]
    if torch.compiler.is_compiling():  # nothing can be timed while tracing: a defined answer
        return DtypeChoice(torch.float32, {}, {}, key, None, measured=False)
    path = _path(key)
    remeasure = remeasure or os.environ.get(ENV_REMEASURE, "").strip() not in ("", "0")
    choice = None if remeasure else _read(path, key)
    if choice is None:
        timer = timer or wall_timer
        ms, dropped = measure(shapes, tokens, timer=timer)
        dtype = pick(ms)
        timer_name = getattr(timer, "__name__", type(timer).__name__)
        threads = torch.get_num_threads()
        record = {"key": key, "dtype": dtype, "ms": ms, "dropped": dropped, "threads": threads,
                  "margin": MARGIN, "max_rounds": ROUNDS, "timer": timer_name}  # fmt: skip
        try:
            atomic_write_json(record, path)
        except OSError as err:
            warnings.warn(f"{path}: dtype cache not written ({err}); kept in memory", stacklevel=2)
            path = None
        choice = DtypeChoice(getattr(torch, dtype), ms, dropped, key, path, measured=True, threads=threads)
        report = _REPORT[-1] if report == "default" else report
        if report is not None:
            report(choice.line())
    _CHOICES[mem] = choice
    return choice

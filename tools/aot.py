"""Ahead-of-time compilation of the package's Triton kernels for GPU targets, on a CPU.

``record`` drives the public launchers (``compile_cases``) with CPU tensors while every
``kernel[grid](...)`` launch is intercepted instead of run; each launch is specialised with Triton's
own binder as its runtime would on the GPU, and an autotuned one expands into every config its
pruner keeps for some token count. ``compile_variant`` compiles one such launch with
``triton.compile`` for a ``GPUTarget`` and the ptxas bundled with Triton, and reads its shared
memory, registers and spills. ``compile_check`` is the command around them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

__all__ = ["SHARED_LIMIT", "SPILL_LIMIT", "Result", "Variant", "all_kernels", "compile_variant", "record"]

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (H100 / A100)
SPILL_LIMIT = 64  # bytes of spill stores tolerated per thread: more is a config to drop
_CONFIG_NAMES = ("BLOCK", "GROUP_M")  # constexprs that belong to a config, not to the variant


@dataclasses.dataclass
class Variant:
    """One binary: a kernel with one constexpr / dtype combination and one config."""

    kernel: str  # the @triton.jit function's name
    variant: str  # its constexprs and pointer dtypes, e.g. "HAS_DROPOUT=1 R_PAD=16 | bf16+fp32"
    config: str  # its tile config, e.g. "BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 w4 s4"
    fn: object = dataclasses.field(repr=False, compare=False)
    args: tuple = dataclasses.field(repr=False, compare=False)
    kwargs: dict = dataclasses.field(repr=False, compare=False)
    weight: int = 0  # a size of the config (tile volume x stages): the subset compiles the heaviest

    @property
    def group(self) -> tuple[str, str]:
        return self.kernel, self.variant


@dataclasses.dataclass
class Result:
    kernel: str
    variant: str
    config: str
    cc: int
    ok: bool
    shared: int | None = None  # bytes of dynamic shared memory
    regs: int | None = None  # registers per thread
    spills: int | None = None  # bytes of spill stores per thread
    seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.ok and self.shared <= SHARED_LIMIT[self.cc] and (self.spills or 0) <= SPILL_LIMIT


# -- recording the launches ---------------------------------------------------------------------------


def _target(cc: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", cc, 32)


@functools.lru_cache(maxsize=None)
def _binder(fn, cc: int):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(cc))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _specialise(fn, args: tuple, kwargs: dict, cc: int):
    """What Triton's runtime hands the compiler for this launch on ``cc``: (options, signature,
    constexprs, attrs), from the kernel's own binder (``JITFunction.run`` does exactly this)."""
    from triton import knobs

    backend, binder = _binder(fn, cc)
    kwargs = {**kwargs, "debug": fn.debug or knobs.runtime.debug,
              "instrumentation_mode": knobs.compilation.instrumentation_mode,
              "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}  # fmt: skip
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _label(fn, specialised) -> tuple[str, str, int]:
    """(variant, config, weight) of a launch from its specialisation."""
    options, signature, constexprs, _ = specialised
    names = [p.name for p in fn.params]
    flags, config, units, weight = [], [], [], options.num_stages
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if not fn.params[path[0]].is_constexpr:
            units.append(name.removeprefix("stride_"))  # Triton's own specialisation of an argument = 1
            continue
        if name == "UPCAST":  # always False on a GPU
            continue
        value = int(value) if isinstance(value, bool) else getattr(value, "name", value)
        (config if name.startswith(_CONFIG_NAMES) else flags).append(f"{name}={value}")
        weight *= value if name.startswith("BLOCK") else 1
    pointers = {n.removesuffix("_ptr"): t[1:] for n, t in signature.items() if str(t).startswith("*")}
    first = next(iter(pointers.values()))
    others: dict[str, list[str]] = {}
    for name, t in pointers.items():
        if t != first:
            others.setdefault(t, []).append(name)
    dtypes = " ".join([first] + [f"{t}:{','.join(names)}" for t, names in others.items()])
    config += [f"w{options.num_warps}", f"s{options.num_stages}"]
    variant = f"{' '.join(flags)} | {dtypes}" + (f" | =1: {','.join(units)}" if units else "")
    return variant.strip(), " ".join(config), weight


def _identity(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16
    return type(v), v


def record(modules=None) -> list[Variant]:
    """Every distinct (kernel, constexprs, config) the launchers of ``modules`` launch, in order."""
    from mbf.kernels.compile_cases import CASES, M_VALUES
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    launches: dict[tuple, tuple] = {}

    def add(fn, args, kwargs):
        # a launch's identity as the binder sees it: argument dtypes and alignment, scalar values
        key = (fn, *(_identity(a) for a in args), *((k, _identity(v)) for k, v in kwargs.items()))
        launches.setdefault(key, (fn, args, kwargs))

    def intercept(kernel, grid):
        def call(*args, **kwargs):
            if not isinstance(kernel, Autotuner):
                return add(kernel, args, kwargs)
            kernel.nargs = dict(zip(kernel.arg_names, args))
            configs = {}  # every config the pruner keeps for some token count (m_bucket is M's key)
            for b in M_VALUES if "m_bucket" in kwargs else (None,):
                kept = kernel.prune_configs(kwargs if b is None else {**kwargs, "m_bucket": b})
                configs.update(dict.fromkeys(kept))
            kernel.nargs = None
            for config in configs:
                add(kernel.fn, args, {**kwargs, **config.all_kwargs()})

        return call

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = intercept
    try:
        for name in modules or CASES:
            for run in CASES[name]():
                run()
    finally:
        KernelInterface.__getitem__ = original
    variants: dict[tuple, Variant] = {}
    for fn, args, kwargs in launches.values():
        specialised = _specialise(fn, args, kwargs, 90)
        key = (fn.__name__, str(specialised))
        if key not in variants:
            variants[key] = Variant(fn.__name__, *_label(fn, specialised)[:2], fn, args, kwargs,
                                    _label(fn, specialised)[2])  # fmt: skip
    return list(variants.values())


# -- compiling ------------------------------------------------------------------------------------------

_PTXAS = re.compile(r"Used (\d+) registers.*|(\d+) bytes stack frame, (\d+) bytes spill stores")


def _ptxas_stats(log: str) -> tuple[int | None, int | None]:
    regs = spills = None
    for m in _PTXAS.finditer(log):
        if m.group(1):
            regs = int(m.group(1))
        else:
            spills = int(m.group(3))
    return regs, spills


def _stats_path(cache: Path, kernel_hash: str) -> Path:
    return cache / "mbf-ptxas" / f"{kernel_hash}.json"


def _rerun_ptxas(ptx: str, cc: int) -> str:
    """ptxas -v on a cached kernel's PTX: the report Triton threw away when it first compiled it."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}",
               str(src), "-o", str(Path(tmp) / "k.o")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


@contextlib.contextmanager
def _captured_stderr():
    """The C++ side prints MLIR diagnostics to fd 2: keep them for the error message, off the console."""
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        text = io.StringIO()
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.write(tmp.read())


def _error_line(err: BaseException, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if "error" in ln.lower()]
    lines = [ln for ln in lines if "Failures have been detected" not in ln] or lines
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} {first}".strip()[:300]


def compile_variant(v: Variant, cc: int) -> Result:
    """Compile ``v`` for compute capability ``cc``: its shared memory, registers and spills."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    start = time.perf_counter()
    options, signature, constexprs, attrs = _specialise(v.fn, v.args, v.kwargs, cc)
    src = ASTSource(v.fn, signature, constexprs, attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v when it runs it (not on a cache hit)
    try:
        with _captured_stderr() as stderr, contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=_target(cc), options=options.__dict__)
    except Exception as err:  # a failed compile is a result, not a crash of the check
        return Result(v.kernel, v.variant, v.config, cc, False, seconds=time.perf_counter() - start,
                      error=_error_line(err, stderr.getvalue()))  # fmt: skip
    finally:
        knobs.nvidia.dump_ptxas_log = False
    stats_file = _stats_path(Path(knobs.cache.dir), kernel.hash)
    regs, spills = _ptxas_stats(log.getvalue())
    if regs is None and stats_file.exists():
        regs, spills = json.loads(stats_file.read_text())
    if regs is None:
        regs, spills = _ptxas_stats(_rerun_ptxas(kernel.asm["ptx"], cc))
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    stats_file.write_text(json.dumps([regs, spills]))
    return Result(v.kernel, v.variant, v.config, cc, True, kernel.metadata.shared, regs, spills,
                  time.perf_counter() - start)  # fmt: skip


def all_kernels(modules) -> list[str]:
    """Names of every ``@triton.jit`` kernel (``*_kernel``) the launcher modules define."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = []
    for module in modules:
        for obj in vars(importlib.import_module(f"mbf.kernels.{module}")).values():
            if isinstance(obj, JITFunction) and obj.__name__.endswith("_kernel"):
                names.append(obj.__name__)
    return sorted(set(names))

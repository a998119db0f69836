"""Ahead-of-time compilation of the package's Triton kernels for GPU targets, on a CPU.

``record`` drives the public launchers (``compile_cases``) with CPU tensors while every
``kernel[grid](...)`` launch is intercepted instead of run; an autotuned one expands into every
config its pruner keeps for some token count. ``specialise`` turns a launch into what Triton's
runtime would compile on a GPU, by the runtime's documented rules (an integer argument equal to 1
becomes a constant, one divisible by 16 and a 16-byte aligned pointer get a divisibility hint,
unless the kernel marks the argument ``do_not_specialize``). ``compile_variant`` compiles it through
Triton's public API, ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32), options=...)`` (as ``triton.tools.compile`` does), with the
ptxas bundled with Triton, and reads shared memory, registers and spills. Nothing here reads
Triton's private runtime: the same code runs under Triton 3.6 and 3.9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
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
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # a launch's compile options
_DTYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}  # fmt: skip


@dataclasses.dataclass
class Variant:
    """One binary: a kernel with one constexpr / dtype combination and one config."""

    kernel: str  # the @triton.jit function's name
    variant: str  # its constexprs and pointer dtypes, e.g. "HAS_DROPOUT=1 R_PAD=16 | bf16 fp32:s"
    config: str  # its tile config, e.g. "BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 w4 s4"
    fn: object = dataclasses.field(repr=False, compare=False)
    spec: tuple = dataclasses.field(repr=False, compare=False)  # (signature, constexprs, attrs, options)
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


# -- specialising a launch ------------------------------------------------------------------------------


def _int_type(value: int, annotation: str) -> str:
    if annotation:
        return annotation
    if -(2**31) <= value < 2**31:
        return "i32"
    return "i64" if value < 2**63 else "u64"


def specialise(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch of ``fn`` (a ``triton.jit`` function)."""
    import torch

    options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    names = [p.name for p in fn.params]
    bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.arguments.get(p.name, p.default)
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            if not p.do_not_specialize and value == 1:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = _int_type(value, p.annotation_type or "")
            if not p.do_not_specialize and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
    return signature, constexprs, attrs, options


def _label(fn, spec) -> tuple[str, str, int]:
    """(variant, config, weight) of a specialised launch."""
    signature, constexprs, _, options = spec
    flags, config, units, weight = [], [], [], options.get("num_stages", 1)
    for p in fn.params:
        if p.name not in constexprs:
            continue
        value = constexprs[p.name]
        if not p.is_constexpr:
            if value is not None:
                units.append(p.name.removeprefix("stride_"))  # an argument equal to 1, specialised
            continue
        if p.name == "UPCAST" or value is None:  # UPCAST: always False on a GPU
            continue
        value = int(value) if isinstance(value, bool) else getattr(value, "name", value)
        (config if p.name.startswith(_CONFIG_NAMES) else flags).append(f"{p.name}={value}")
        weight *= value if p.name.startswith("BLOCK") else 1
    pointers = {n.removesuffix("_ptr"): t[1:] for n, t in signature.items() if t.startswith("*")}
    first = next(iter(pointers.values()))
    others: dict[str, list[str]] = {}
    for name, t in pointers.items():
        if t != first:
            others.setdefault(t, []).append(name)
    dtypes = " ".join([first] + [f"{t}:{','.join(names)}" for t, names in others.items()])
    config += [f"w{options.get('num_warps', 4)}", f"s{options.get('num_stages', 3)}"]
    variant = f"{' '.join(flags)} | {dtypes}" + (f" | =1: {','.join(units)}" if units else "")
    return variant.strip(), " ".join(config), weight


# -- recording the launches ---------------------------------------------------------------------------


def record(modules=None) -> list[Variant]:
    """Every distinct (kernel, constexprs, config) the launchers of ``modules`` launch, in order."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    from tools.compile_cases import CASES, M_VALUES

    launches: list[tuple] = []

    def intercept(kernel, grid):
        def call(*args, **kwargs):
            if not isinstance(kernel, Autotuner):
                return launches.append((kernel, args, kwargs))
            configs = {}  # every config the pruner keeps for some token count (m_bucket is M's key)
            nargs = dict(zip(kernel.arg_names, args))
            for b in M_VALUES if "m_bucket" in kwargs else (None,):
                kw = kwargs if b is None else {**kwargs, "m_bucket": b}
                configs.update(dict.fromkeys(kernel.early_config_prune(kernel.configs, nargs, **kw)))
            for config in configs:
                launches.append((kernel.fn, args, {**kwargs, **config.all_kwargs()}))

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
    for fn, args, kwargs in launches:
        spec = specialise(fn, args, kwargs)
        key = (fn.__name__, repr(spec))
        if key not in variants:
            variants[key] = Variant(fn.__name__, *_label(fn, spec)[:2], fn, spec, _label(fn, spec)[2])
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


def _rerun_ptxas(ptx: str, cc: int) -> str:
    """ptxas -v on a kernel's PTX (a cache hit: Triton did not run ptxas this time)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(cc).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")]
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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    signature, constexprs, attrs, options = v.spec
    src = ASTSource(fn=v.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v when it runs it (not on a cache hit)
    try:
        with _captured_stderr() as stderr, contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as err:  # a failed compile is a result, not a crash of the check
        return Result(v.kernel, v.variant, v.config, cc, False, seconds=time.perf_counter() - start,
                      error=_error_line(err, stderr.getvalue()))  # fmt: skip
    finally:
        os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    stats_file = cache / "mbf-ptxas" / f"{kernel.hash}.json"
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

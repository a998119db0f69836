"""The measuring stages of the one-go GPU run (``mbf.bench.gpu`` runs them in order, each under its
own time limit). Every row is appended to the results file the moment it is measured.

A stage gets a ``Ctx``: the row writer, the device, whether this is the CPU dry run (tiny shapes
through Triton's interpreter) and the stage's deadline; a case that would start after the
deadline is skipped and said so, and a case that fails is printed and skipped, never fatal. A case
of a provider whose package the preflight found missing (``mbf.bench.preflight``) is skipped
before it builds anything, and listed in the stage's timeline entry.

Timed loops run with the run's Triton variant counter (``Ctx.counter``) paused: a measurement's
untimed first call, where its kernels compile and autotune, is where its variants are counted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Ctx", "boundary", "correctness", "headline", "nf4", "run_case", "timed_inside", "train_step"]

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_DTYPES = (torch.float32, torch.bfloat16)  # mbf's default (PEFT's autocast) first, then 16-bit


@dataclass
class Ctx:
    """What a stage needs: where rows go, on which device, and until when."""

    writer: object  # mbf.bench.rows.RowWriter
    label: str  # the device's name for the rows
    dev: str  # "cuda" or "cpu"
    dry_run: bool
    out: Path
    deadline: float  # time.time() after which no case starts
    counter: object = None  # the run's Triton variant counter (mbf.bench.launches.LaunchRecorder)
    lost: dict[str, list[str]] = field(default_factory=dict)  # provider -> its missing packages
    skipped: list[str] = field(default_factory=list)  # cases skipped for a missing package

    def paused(self) -> contextlib.AbstractContextManager:
        """The variant counter's hook out of the way (for a timed loop)."""
        return self.counter.paused() if self.counter is not None else contextlib.nullcontext()

    def timing(self, fn: Callable[[], object]) -> dict:
        """``time_fn`` of ``fn`` after one untimed call (the warm-up: compiles and autotuning), the
        only one the variant counter sees; the timed calls run with it paused."""
        from mbf.bench.timing import time_fn

        fn()
        with self.paused():
            return time_fn(fn, self.dev, warmup=0, rep=1) if self.dry_run else time_fn(fn, self.dev)


@contextlib.contextmanager
def timed_inside(ctx: Ctx, module) -> Iterator[None]:
    """``module.time_fn`` with the variant counter paused, for measurements that time inside
    (``boundary.measure_boundary``, ``train_step.measure_step``): their untimed warm-up calls run
    every kernel they launch and are counted; their timed loops are not."""
    timed = module.time_fn

    def paused_time_fn(*args, **kwargs):
        with ctx.paused():
            return timed(*args, **kwargs)

    module.time_fn = paused_time_fn
    try:
        yield
    finally:
        module.time_fn = timed


def run_case(ctx: Ctx, name: str, fn: Callable[[], object], provider: str | None = None) -> object:
    """``fn()``, timed and printed; None when it fails, ``provider``'s package is missing or the
    stage's time is up."""
    if provider in ctx.lost:
        print(f"  {name}: SKIPPED (preflight: {', '.join(ctx.lost[provider])} missing)", flush=True)
        ctx.skipped.append(name)
        return None
    if time.time() > ctx.deadline:
        print(f"  {name}: SKIPPED (the stage's time limit is spent)", flush=True)
        return None
    t0 = time.time()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - a missing provider or an OOM skips the case, not the run
        print(f"  {name}: SKIPPED ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()
        return None
    print(f"  {name}: {time.time() - t0:.1f} s", flush=True)
    return out


def _auto_entry(ctx: Ctx, K: int, N: int, M: int, r: int, adapter_dtype: torch.dtype) -> dict:
    """What the dispatch measured and chose for this headline case (``chose``, ``candidates_ms``)."""
    from mbf.functional import dispatch

    device = torch.cuda.get_device_name() if ctx.dev == "cuda" else "cpu"
    case = dispatch.Case(
        device, "bfloat16", str(adapter_dtype)[6:], False, True, r, K, N, dispatch._bucket(M)
    )
    entry = dispatch.default_dispatcher().choices.get(dispatch.case_key(case), {})
    extra = {
        "chose": entry.get("backend"),
        "candidates_ms": entry.get("ms"),
        "candidate_notes": entry.get("notes"),
    }
    return {**extra, "extra_keys": ["chose"]}


def _lora_row(ctx: Ctx, provider: str, K: int, N: int, M: int, r: int, mode: str, adapter_dtype) -> None:
    from mbf.bench.layers import lora_case
    from mbf.bench.rows import timed_row
    from mbf.bench.timing import peak_memory

    fn, flops = lora_case(provider, K, N, M, r, mode, torch.bfloat16, ctx.dev, adapter_dtype=adapter_dtype)
    t = ctx.timing(fn)
    case = dict(op="lora_linear", provider=provider, mode=mode, shape=f"{K}->{N}", M=M, r=r, dtype="bfloat16")
    if adapter_dtype is not None:
        case["adapter_dtype"] = str(adapter_dtype)[6:]
    extra = _auto_entry(ctx, K, N, M, r, adapter_dtype) if provider == "mbf-auto" else {}
    row = timed_row(**case, device=ctx.label, timing=t, flops=flops, peak_mem_bytes=peak_memory(fn, ctx.dev))
    ctx.writer.append({**row, **extra})


def _breakdown_row(ctx: Ctx, provider: str, K: int, N: int, M: int, r: int, adapter_dtype) -> None:
    from mbf.bench.launches import breakdown
    from mbf.bench.layers import lora_case
    from mbf.bench.rows import make_row

    fn, _ = lora_case(provider, K, N, M, r, "full", torch.bfloat16, ctx.dev, adapter_dtype=adapter_dtype)
    kernels = breakdown(fn, ctx.dev == "cuda", reps=1 if ctx.dry_run else 5, counter=ctx.counter)
    ctx.writer.append(
        make_row(
            op="kernel_breakdown", provider=provider, mode="full", shape=f"{K}->{N}", M=M, r=r,
            dtype="bfloat16", adapter_dtype=str(adapter_dtype)[6:], device=ctx.label,
            ms=sum(k["ms"] for k in kernels.values()), kernels=kernels,
            timer="CUDA events per launch" if ctx.dev == "cuda" else "wall clock per launch",
        )
    )  # fmt: skip


def headline(ctx: Ctx) -> None:
    """LoRA fwd+bwd at M = 8192, r = 16, bf16 on Llama's 4096→4096 and 4096→14336, adapters fp32 and
    bf16: the floor, PEFT (same adapter dtype), mbf's torch / fused / hybrid paths and ``auto``; then
    the forward alone (the Triton base GEMM against cuBLAS); then the per-kernel breakdowns."""
    shapes = ((64, 96),) if ctx.dry_run else ((4096, 4096), (4096, 14336))
    M, r = (48, 4) if ctx.dry_run else (8192, 16)
    full = ("peft", "mbf-torch", "mbf-triton", "mbf-hybrid", "mbf-auto")
    for K, N in shapes:
        run_case(ctx, f"lora {K}->{N} full floor", lambda: _lora_row(ctx, "floor", K, N, M, r, "full", None))
        for ad in ADAPTER_DTYPES:
            for p in full:
                run_case(ctx, f"lora {K}->{N} full {p} {ad}",
                         lambda: _lora_row(ctx, p, K, N, M, r, "full", ad), p)  # fmt: skip
    some = ADAPTER_DTYPES[:1] if ctx.dry_run else ADAPTER_DTYPES  # the interpreter is slow: one suffices
    for K, N in shapes:
        for p, ad in (("floor", None), ("triton-gemm", None), *(("mbf-triton", ad) for ad in some)):
            run_case(ctx, f"lora {K}->{N} fwd {p} {ad}", lambda: _lora_row(ctx, p, K, N, M, r, "fwd", ad))
    for K, N in shapes:
        for ad in some:
            for p in ("mbf-torch", "mbf-triton", "mbf-auto", "peft"):
                row = lambda: _breakdown_row(ctx, p, K, N, M, r, ad)  # noqa: E731
                run_case(ctx, f"breakdown {K}->{N} {p} {ad}", row, p)


def correctness(ctx: Ctx) -> None:
    """The autotuned fused path (configs NOT pinned) and the dispatch's choice against the float64
    reference and the torch path at the headline shapes: ``tests/test_dispatch.py -k headline``."""
    env = {k: v for k, v in os.environ.items() if k != "MBF_PIN_CONFIGS"}
    run_pytest(ctx, ["tests/test_dispatch.py", "-k", "headline"], "correctness", env)


def run_pytest(
    ctx: Ctx, args: list[str], name: str, env: dict, extra: list[str] = (), keep_log=False
) -> None:
    """pytest in a subprocess until the deadline; its JUnit XML is written even when time runs out
    (pytest is interrupted first, then killed; an XML naming the timeout is written if it left none).
    Its output goes to ``<name>.log`` with ``keep_log``, else into run.log (the device returns 8 files)."""
    xml = ctx.out / f"{name}.xml"
    log = ctx.out / f"{name}.log" if keep_log else Path(tempfile.mkstemp(suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *args,
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfEs",
        f"--junitxml={xml}",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, *extra], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=max(5.0, ctx.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.send_signal(2)  # SIGINT: pytest stops and still writes its report
            try:
                rc = f"interrupted at the time limit ({proc.wait(timeout=20)})"
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed at the time limit"
    if not xml.exists():
        xml.write_text(
            '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" '
            f'tests="1"><testcase classname="{name}" name="stage"><error message="{rc}"/></testcase>'
            "</testsuite></testsuites>"
        )
    print("\n".join(log.read_text().splitlines()[-12 if keep_log else -200 :]))
    print(f"{name}: pytest exit {rc} ({xml.name}{', ' + log.name if keep_log else ''})")
    if not keep_log:
        log.unlink()


def nf4(ctx: Ctx) -> None:
    """QLoRA linear fwd+bwd at M = 2048: NF4 paths vs the bf16 floor and PEFT + bitsandbytes."""
    from mbf.bench.layers import NF4_PROVIDERS, nf4_case
    from mbf.bench.rows import timed_row
    from mbf.bench.timing import peak_memory

    shapes = ((64, 96),) if ctx.dry_run else ((4096, 4096), (4096, 14336))
    M, r = (48, 4) if ctx.dry_run else (2048, 16)

    def one(provider, K, N):
        step, flops, nbytes = nf4_case(provider, K, N, M, r, torch.bfloat16, ctx.dev)
        case = dict(op="nf4_lora_linear", provider=provider, mode="full", shape=f"{K}->{N}", M=M, r=r)
        row = timed_row(**case, dtype="bfloat16", device=ctx.label, timing=ctx.timing(step), flops=flops)
        ctx.writer.append({**row, "peak_mem_bytes": peak_memory(step, ctx.dev), "base_bytes": nbytes})

    for K, N in shapes:
        for provider in NF4_PROVIDERS:
            run_case(ctx, f"nf4 {K}->{N} M={M} {provider}", lambda: one(provider, K, N), provider)


def boundary(ctx: Ctx) -> None:
    """SLAO's task boundary for every adapter of Llama-3-8B (224) against a per-layer loop."""
    from mbf.bench import boundary as bnd
    from mbf.bench.rows import make_row

    model, layers = ("smollm2-135m", 1) if ctx.dry_run else ("llama-3-8b", None)

    def one():
        for row in bnd.measure_boundary(model, 4 if ctx.dry_run else 16, ctx.dev, layers=layers):
            ctx.writer.append(make_row(device=ctx.label, **row))

    with timed_inside(ctx, bnd):
        run_case(ctx, f"task boundary {model}", one)


def train_step(ctx: Ctx) -> None:
    """The QLoRA training step (tokens/s, peak memory) vs PEFT + bitsandbytes, then the 16-bit step."""
    from mbf.bench import train_step as ts
    from mbf.bench.rows import make_row

    model, layers, seq = ("smollm2-135m", 1, 32) if ctx.dry_run else ("llama-3-8b", 4, 2048)
    for provider in ("peft-bnb4", "mbf-nf4", "peft", "mbf"):  # the baseline first
        cfg = ts.StepConfig(
            model=model, layers=layers, provider=provider, seq=seq, batch=1, r=4 if ctx.dry_run else 16,
            device=ctx.dev, warmup=1, steps=2 if ctx.dry_run else 5,
            dtype="float32" if ctx.dry_run else "bfloat16",  # a CPU without fast bf16 emulates it
        )  # fmt: skip
        with timed_inside(ctx, ts):
            run_case(ctx, f"train step {model} x{layers}L {provider}", lambda: ctx.writer.append(
                make_row(device=ctx.label, **ts.measure_step(cfg))), provider)  # fmt: skip
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()

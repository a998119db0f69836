"""Everything a lent GPU should measure, in one call sized for a 10-minute window.

    bash bench/run_gpu.sh            # installs the checkout (no deps), then the preflight and the stages
    python -m mbf.bench.gpu --dry-run --out /tmp/dry   # the same stages on CPU, tiny shapes

First the preflight (``mbf.bench.preflight``): every module and file a stage needs, one line each;
a stage whose needs are not met is skipped and recorded as such, a provider whose package is
missing (PEFT, bitsandbytes) loses its rows, and the other stages run. Then the stages in order,
each under its own time limit (seconds on a GPU; ``STAGES``), every row appended to
``<device>-<date>.json`` under ``--out`` (default ``$OUT``, else ``bench/results``) as measured:

1. ``environment`` (20): ``environment.json`` (device, driver, capability, versions, nvidia-smi),
   and the kernels import (the run stops here, loudly, when they do not);
2. ``headline`` (110): LoRA fwd+bwd, M = 8192, r = 16, bf16, 4096→4096 and 4096→14336, adapters fp32
   and bf16: the cuBLAS floor, PEFT with the same adapter dtype, mbf's torch / fused / hybrid paths
   and ``auto`` (with what its dispatch measured and chose); the forward alone with the Triton base
   GEMM against cuBLAS; a per-kernel breakdown (CUDA events) of each mbf path and PEFT;
3. ``correctness`` (60): the autotuned fused path (configs not pinned) and the dispatch's choice
   against the float64 reference and the torch path at the headline shapes (``correctness.xml``);
4. ``nf4`` (60): the QLoRA linear at M = 2048 vs the floor and PEFT + bitsandbytes;
5. ``boundary`` (30): SLAO's task boundary for Llama-3-8B's 224 adapters vs a per-layer loop;
6. ``train step`` (100): the QLoRA step (tokens/s, peak memory) vs PEFT + bitsandbytes, then 16-bit;
7. ``tests`` (the rest, at least 100): the GPU test files, ``-n 8`` with a per-test timeout and
   configs pinned (a few compiles), JUnit XML written even on a timeout (``gpu-tests.xml``).

``timeline.json`` records the preflight's checks, then each stage's start, end, status (``skipped``
with the needs it lacked), rows written, cases skipped for a missing package and the Triton
variants it launched for the first time in this process (each a compile on a cold GPU machine;
under the interpreter one config per autotuned kernel, on a GPU every candidate the pruner keeps;
counted in each measurement's untimed warm-up call, the counter paused while timed loops run; the
two pytest stages run in their own processes and are not counted); ``run.log`` holds everything
printed. At most 7 files, as the device tool returns 8.
``--dry-run`` runs every stage on this CPU through Triton's interpreter with tiny shapes and a
2-test smoke of the tests (CI runs it). It measures; it never asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from mbf.bench import gpu_stages, preflight
from mbf.bench.gpu_stages import ROOT, Ctx

__all__ = ["STAGES", "main"]

PIN_ENV = "MBF_PIN_CONFIGS"  # one config per kernel in the tests (mbf/kernels/lora_configs.py): correctness
TEST_FILES = preflight.TEST_FILES
# (name, seconds on a GPU): the tests take what is left of --budget-s, at least their own entry
STAGES = (("environment", 20), ("headline", 110), ("correctness", 60), ("nf4", 60), ("boundary", 30),
          ("train step", 100), ("tests", 100))  # fmt: skip
DRY_LIMIT = 300  # seconds per stage in a dry run: a hung stage cannot stall CI; a loaded one runs all
GRACE = 30  # seconds past a stage's limit before its alarm interrupts a case that does not return


class StageTimeout(BaseException):
    """A stage ran past its limit and its grace (a BaseException: a case's except does not catch it)."""


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _alarm(seconds: float):
    def fire(signum, frame):
        raise StageTimeout(f"past its limit + {GRACE} s")

    if not hasattr(signal, "SIGALRM"):
        return contextlib.nullcontext()
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(max(1, int(seconds)))

    @contextlib.contextmanager
    def scope():
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    return scope()


class Run:
    """The stages' shared state: the clock, the timeline, the Triton variants seen so far."""

    def __init__(self, out: Path, dry_run: bool, budget: float) -> None:
        from mbf.bench.launches import LaunchRecorder

        self.out, self.dry_run, self.budget = out, dry_run, budget
        self.t0 = time.time()
        self.timeline: list[dict] = []
        self.counter = LaunchRecorder(cuda=False, timed=False)  # counts variants, times nothing

    def stage(self, name: str, limit: float, fn, ctx: Ctx | None = None) -> bool:
        """Run one stage under its limit; a failure is printed with its traceback and the run goes on."""
        start = time.time()
        if ctx is not None:
            ctx.deadline = start + limit
        rows0 = len(ctx.writer) if ctx is not None else 0
        skipped0 = len(ctx.skipped) if ctx is not None else 0
        seen = set(self.counter.variants)
        print(f"\n== {name} (limit {limit:.0f} s, at {start - self.t0:.0f} s)", flush=True)
        status = "done"
        try:
            with _alarm(limit + GRACE):
                fn(ctx) if ctx is not None else fn()
        except (Exception, StageTimeout):  # noqa: BLE001 - every stage is best effort: report and go on
            traceback.print_exc(file=sys.stdout)
            status = "failed"
        end = time.time()
        new = sorted({v[0] for v in self.counter.variants - seen})
        entry = {
            "stage": name, "start_s": round(start - self.t0, 1), "end_s": round(end - self.t0, 1),
            "seconds": round(end - start, 1), "limit_s": limit, "status": status,
            "rows": (len(ctx.writer) - rows0) if ctx is not None else 0,
            "new_triton_variants": len(self.counter.variants - seen), "kernels": new,
        }  # fmt: skip
        if ctx is not None and ctx.skipped[skipped0:]:
            entry["skipped_cases"] = ctx.skipped[skipped0:]  # their packages are missing (preflight)
        self._record(entry)
        print(f"== {name}: {status} in {end - start:.1f} s, {entry['rows']} rows, "
              f"{entry['new_triton_variants']} new Triton variants", flush=True)  # fmt: skip
        return status == "done"

    def skip(self, name: str, limit: float, missing: list[str]) -> None:
        """Record a stage the preflight ruled out: it never starts."""
        at = round(time.time() - self.t0, 1)
        print(f"\n== {name}: SKIPPED (preflight: {', '.join(missing)} missing)", flush=True)
        self._record({"stage": name, "start_s": at, "end_s": at, "seconds": 0.0, "limit_s": limit,
                      "status": "skipped", "missing": missing, "rows": 0, "new_triton_variants": 0,
                      "kernels": []})  # fmt: skip

    def preflight(self, checks: list, seconds: float) -> None:
        self._record({"stage": "preflight", "start_s": 0.0, "end_s": round(seconds, 1),
                      "seconds": round(seconds, 1), "status": "done",
                      "checks": [c.to_json() for c in checks]})  # fmt: skip

    def _record(self, entry: dict) -> None:
        from mbf.io import atomic_write_json

        self.timeline.append(entry)
        atomic_write_json(self.timeline, self.out / "timeline.json", indent=1)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)


def _environment(out: Path, device: str) -> None:
    import importlib

    import torch

    from mbf.io import atomic_write_json, versions

    env = {
        "device": device,
        "versions": versions(),
        "cuda": torch.version.cuda,
        "date": _dt.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        env["capability"] = list(torch.cuda.get_device_capability())
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False, timeout=15)
        env["nvidia_smi"] = (smi.stdout + smi.stderr).splitlines()
        env["driver"] = next((ln.split("Driver Version:")[1].split()[0] for ln in smi.stdout.splitlines()
                              if "Driver Version:" in ln), None)  # fmt: skip
    atomic_write_json(env, out / "environment.json", indent=2)
    print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}, indent=1))
    for name in ("lora_op", "nf4", "ortho", "merge"):
        importlib.import_module(f"mbf.kernels.{name}")
    print("mbf.kernels: lora_op, nf4, ortho, merge import")


def _tests(ctx: Ctx) -> None:
    files = [str(ROOT / "tests" / f) for f in TEST_FILES]
    extra = []
    if importlib.util.find_spec("xdist") is not None:
        extra += ["-n", "2" if ctx.dry_run else "8"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        extra += ["--timeout", "60" if ctx.dry_run else "120"]
    if ctx.dry_run:
        extra += ["-k", "dropout_mask_is_the_reference_mask or dequant_kernel_bit_exact"]
    gpu_stages.run_pytest(ctx, files, "gpu-tests", {**os.environ, PIN_ENV: "1"}, extra, keep_log=True)


def _use_dispatcher(counter, dry_run: bool) -> None:
    """The dispatch's timer (what ``auto`` chooses by) with the variant counter paused: the
    candidates' warm-up calls, outside the timer, are counted, their timed calls pay no hook. The dry
    run times each candidate in 2 rounds of single calls (the interpreter is slow) and caches in a
    temporary folder; a GPU run measures as users do, into the user's cache."""
    from mbf.functional import dispatch

    folder = Path(tempfile.mkdtemp(prefix="mbf-gpu-dry-cache-")) / "dispatch" if dry_run else None

    def paused_timer(fn) -> float:
        with counter.paused():
            return dispatch.cuda_event_timer(fn)

    quick = {"rounds": 2, "max_inner": 1} if dry_run else {}
    dispatch.use_dispatcher(dispatch.Dispatcher(timer=paused_timer, folder=folder, **quick))


def _bodies() -> dict:
    """The measuring stages after ``environment``, in order: ``{name: fn(ctx)}``."""
    g = gpu_stages
    return {"headline": g.headline, "correctness": g.correctness, "nf4": g.nf4, "boundary": g.boundary,
            "train step": g.train_step, "tests": _tests}  # fmt: skip


def main(argv: list[str] | None = None, checks: list | None = None, preflight_s: float = 0.0) -> int:
    """Run the stages (``checks``: the preflight's, when ``bench/run_gpu.sh`` ran it in this process)."""
    parser = argparse.ArgumentParser(prog="python -m mbf.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="where everything is written (default: $OUT, else bench/results; "
                             "a temporary folder with --dry-run)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run's seconds (GPU)")
    args = parser.parse_args(argv)
    if args.out is None:  # a dry run's CPU rows must never land among the committed results
        env_out = os.environ.get("OUT")
        default = tempfile.mkdtemp(prefix="mbf-gpu-dry-") if args.dry_run else ROOT / "bench" / "results"
        args.out = Path(env_out or default)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (the preflight does)
    run = Run(args.out, args.dry_run, args.budget_s)
    run.t0 -= preflight_s  # the preflight run before (bench/run_gpu.sh) counts from the start too
    with open(args.out / "run.log", "a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        if checks is None:
            checks = preflight.check(args.dry_run)
            preflight_s = time.time() - run.t0
        print("\n".join(preflight.lines(checks)), flush=True)
        run.preflight(checks, preflight_s)
        limits = dict(STAGES)
        skip = preflight.skipped_stages(checks, list(limits))
        if "environment" in skip:  # a need of every stage
            no_cuda = not args.dry_run and "CUDA" in skip["environment"]
            print("no CUDA device: run with --dry-run on a CPU" if no_cuda else "no stage can run")
            for name, limit in STAGES:
                run.skip(name, limit, skip[name])
            return 2 if no_cuda else 3
        from mbf.bench.rows import FLOOR, RowWriter, device_name, slug

        _use_dispatcher(run.counter, args.dry_run)
        dev = "cpu" if args.dry_run else "cuda"
        label = device_name(dev) + (" (dry run)" if args.dry_run else "")
        results = args.out / f"{slug(label)}-{_dt.date.today().isoformat()}.json"
        references = {"lora_linear": FLOOR, "nf4_lora_linear": FLOOR, "task_boundary": "per-layer-loop",
                      "train_step": "peft-bnb4"}  # fmt: skip
        ctx = Ctx(RowWriter(results, references), label, dev, args.dry_run, args.out, deadline=0.0,
                  counter=run.counter, lost=preflight.lost_providers(checks))  # fmt: skip
        with run.counter:
            if not run.stage(
                "environment", limits["environment"], functools.partial(_environment, args.out, label)
            ):
                print("mbf.kernels does not import: install the checkout (pip install --no-deps -e .)")
                return 3
            for name, fn in _bodies().items():
                if name in skip:
                    run.skip(name, limits[name], skip[name])
                    continue
                limit = limits[name]
                if name == "tests":  # what is left of the budget, at least its own entry
                    limit = max(limit, run.left())
                run.stage(name, DRY_LIMIT if args.dry_run else limit, fn, ctx)
        if len(ctx.writer):
            print(ctx.writer.summary())
        print("\ntimeline (s from the start): " + ", ".join(
            f"{e['stage']} {e['start_s']:.0f}-{e['end_s']:.0f} ({e['new_triton_variants']} variants)"
            if e["status"] != "skipped" else f"{e['stage']} skipped"
            for e in run.timeline if e["stage"] != "preflight"))  # fmt: skip
        print(f"finished in {time.time() - run.t0:.0f} s; results: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Everything a lent GPU should measure, in one call that survives a cold cache and a timeout.

    bash bench/run_gpu.sh            # installs the checkout (no deps), then python -m mbf.bench.gpu
    python -m mbf.bench.gpu --dry-run --out /tmp/dry   # the same stages on CPU, tiny shapes

Stages, each written under ``--out`` (default ``$OUT`` or ``bench/results``) as soon as it ends:

1. ``environment.json`` and ``nvidia-smi.txt``: device, driver, CUDA capability, torch, triton;
2. the kernels import (``mbf.kernels``): the run stops here, loudly, when they do not;
3. the GPU tests (kernel, NF4, ortho, merge, QLoRA test files) with one pinned config per kernel
   (``MBF_PIN_CONFIGS=1``: no autotuning, a few compiles), never stopping at a failure:
   ``gpu-tests.log`` and ``gpu-tests.xml``;
4. the headline benchmarks, each row appended to ``<device>-<date>.json`` as it is measured: fused
   LoRA fwd+bwd and fwd vs the cuBLAS floor, PEFT and mbf's torch path (M = 8192, 4096→4096 and
   4096→14336, r = 16, bf16: the fwd row against the floor is the Triton GEMM against cuBLAS); NF4
   vs the floor and PEFT + bitsandbytes (M = 2048); SLAO's task boundary for Llama-3-8B's 224
   adapters vs a per-layer loop; the end-to-end QLoRA training step (tokens/s, peak memory);
5. the rest of the kernel benchmark matrices (``bench/test_bench_lora.py``, ``test_bench_nf4.py``)
   for as long as ``--budget-s`` lasts.

``run.log`` holds everything printed. ``--dry-run`` runs stages 1, 2, 4 on this CPU through Triton's
interpreter with tiny shapes (and a 2-test smoke of stage 3), so the script is proven before a GPU
ever sees it (CI runs it). It measures; it never asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["main"]

PIN_ENV = "MBF_PIN_CONFIGS"  # one config per kernel in the tests (kernels/lora_configs.py): correctness
TEST_FILES = ("test_kernel_lora.py", "test_kernel_nf4.py", "test_ortho.py", "test_merge.py", "test_qlora.py")
ROOT = Path(__file__).resolve().parents[2]


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


def _stage(name: str, fn, *args) -> bool:
    """Run one stage; a failure is printed with its traceback and the next stage still runs."""
    t0 = time.time()
    print(f"\n== {name}", flush=True)
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - every stage is best effort: report and go on
        traceback.print_exc(file=sys.stdout)
        print(f"== {name}: FAILED after {time.time() - t0:.0f} s", flush=True)
        return False
    print(f"== {name}: done in {time.time() - t0:.0f} s", flush=True)
    return True


def _environment(out: Path, device: str) -> None:
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
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        env["driver"] = next((ln.split("Driver Version:")[1].split()[0] for ln in smi.stdout.splitlines()
                              if "Driver Version:" in ln), None)  # fmt: skip
    atomic_write_json(env, out / "environment.json", indent=2)
    print(json.dumps(env, indent=1))


def _kernels_import() -> None:
    import importlib

    for name in ("lora_op", "nf4", "ortho", "merge"):
        importlib.import_module(f"mbf.kernels.{name}")
    print("mbf.kernels: lora_op, nf4, ortho, merge import")


def _gpu_tests(out: Path, dry_run: bool, timeout: float) -> None:
    files = [str(ROOT / "tests" / f) for f in TEST_FILES]
    select = ["-k", "dropout_mask_is_the_reference_mask or dequant_kernel_bit_exact"] if dry_run else []
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-rfEs",
           f"--junitxml={out / 'gpu-tests.xml'}", *select]  # fmt: skip
    env = {**os.environ, PIN_ENV: "1"}
    with open(out / "gpu-tests.log", "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = (out / "gpu-tests.log").read_text().splitlines()[-15:]
    print("\n".join(tail))
    print(f"GPU tests: exit {rc} (the log and junit xml are in {out})")


def _headline(writer, device_label: str, dev: str, dry_run: bool) -> None:
    import torch

    from mbf.bench import boundary, train_step
    from mbf.bench.layers import LORA_PROVIDERS, NF4_PROVIDERS, lora_case, nf4_case
    from mbf.bench.rows import make_row, timed_row
    from mbf.bench.timing import peak_memory, time_fn

    dtype = torch.bfloat16
    shapes = ((64, 96),) if dry_run else ((4096, 4096), (4096, 14336))
    M, M_nf4, r = (48, 48, 4) if dry_run else (8192, 2048, 16)
    for K, N in shapes:
        for mode, providers in (("full", LORA_PROVIDERS), ("fwd", ("floor", "mbf-triton"))):
            for provider in providers:
                with _case(f"lora {K}->{N} M={M} {mode} {provider}"):
                    fn, flops = lora_case(provider, K, N, M, r, mode, dtype, dev)
                    t = time_fn(fn, dev, warmup=1, rep=2) if dry_run else time_fn(fn, dev)
                    case = dict(op="lora_linear", provider=provider, mode=mode, shape=f"{K}->{N}", M=M, r=r)
                    peak = peak_memory(fn, dev)
                    row = timed_row(**case, dtype="bfloat16", device=device_label, timing=t, flops=flops)
                    writer.append({**row, "peak_mem_bytes": peak})
        for provider in NF4_PROVIDERS:
            with _case(f"nf4 {K}->{N} M={M_nf4} {provider}"):
                step, flops, nbytes = nf4_case(provider, K, N, M_nf4, r, dtype, dev)
                step()
                t = time_fn(step, dev, warmup=1, rep=2) if dry_run else time_fn(step, dev)
                case = dict(
                    op="nf4_lora_linear", provider=provider, mode="full", shape=f"{K}->{N}", M=M_nf4, r=r
                )
                peak = peak_memory(step, dev)
                row = timed_row(**case, dtype="bfloat16", device=device_label, timing=t, flops=flops)
                writer.append({**row, "peak_mem_bytes": peak, "base_bytes": nbytes})
    model, layers = ("smollm2-135m", 1) if dry_run else ("llama-3-8b", None)
    with _case(f"task boundary {model}"):
        for row in boundary.measure_boundary(model, 4 if dry_run else 16, dev, layers=layers):
            writer.append(make_row(device=device_label, **row))
    step_model, step_layers, seq = ("smollm2-135m", 1, 32) if dry_run else ("llama-3-8b", 4, 2048)
    for provider in ("peft-bnb4", "mbf-nf4", "peft", "mbf"):  # the baseline first
        cfg = train_step.StepConfig(
            model=step_model,
            layers=step_layers,
            provider=provider,
            seq=seq,
            batch=1,
            r=4 if dry_run else 16,
            device=dev,
            warmup=1,
            steps=2 if dry_run else 5,
        )
        with _case(f"train step {step_model} x{step_layers}L {provider}"):
            writer.append(make_row(device=device_label, **train_step.measure_step(cfg)))
        if dev == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _case(name: str):
    """One benchmark case: its failure (a missing provider, out of memory) is printed, not fatal."""
    t0 = time.time()
    try:
        yield
        print(f"  {name}: {time.time() - t0:.1f} s", flush=True)
    except Exception as err:  # noqa: BLE001
        print(f"  {name}: SKIPPED ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)


def _matrices(out: Path, results: Path, timeout: float) -> None:
    files = [str(ROOT / "bench" / f) for f in ("test_bench_lora.py", "test_bench_nf4.py")]
    env = {**os.environ, "MBF_BENCH_RESULTS": str(results.parent)}
    with open(out / "bench-matrices.log", "w") as log:
        try:
            cmd = [sys.executable, "-m", "pytest", *files, "-q", "-s", "-p", "no:cacheprovider"]
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"the matrices stopped at the time budget; every row measured is in {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbf.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="where everything is written (default: $OUT, else bench/results; "
                             "a temporary folder with --dry-run)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="stop measuring after this many seconds"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.out is None:  # a dry run's CPU rows must never land among the committed results
        env_out = os.environ.get("OUT")
        args.out = Path(
            env_out
            or (tempfile.mkdtemp(prefix="mbf-gpu-dry-") if args.dry_run else ROOT / "bench" / "results")
        )
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with open(args.out / "run.log", "a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        import torch

        from mbf.bench.rows import FLOOR, RowWriter, device_name, slug

        if not args.dry_run and not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a CPU")
            return 2
        dev = "cpu" if args.dry_run else "cuda"
        label = device_name(dev) + (" (dry run)" if args.dry_run else "")
        results = args.out / f"{slug(label)}-{_dt.date.today().isoformat()}.json"
        references = {"lora_linear": FLOOR, "nf4_lora_linear": FLOOR, "task_boundary": "per-layer-loop",
                      "train_step": "peft-bnb4"}  # fmt: skip
        writer = RowWriter(results, references)
        _stage("environment", _environment, args.out, label)
        if not _stage("kernels import", _kernels_import):
            print("mbf.kernels does not import: install the checkout (pip install --no-deps -e .) and triton")
            return 3
        _stage("GPU tests", _gpu_tests, args.out, args.dry_run, 60 if args.dry_run else 240)
        _stage("headline benchmarks", _headline, writer, label, dev, args.dry_run)
        left = args.budget_s - (time.time() - t_start)
        if not args.dry_run and left > 30:
            _stage("benchmark matrices", _matrices, args.out, results, left)
        if len(writer):
            print(writer.summary())
        print(f"\nfinished in {time.time() - t_start:.0f} s; results: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every Triton kernel variant the launchers can produce, for sm_90 and sm_80, on a CPU.

No GPU is needed: ``triton.compile`` takes a ``GPUTarget`` and runs the ptxas bundled with Triton.
What Triton's interpreter cannot see shows up here: a layout it cannot lower (an i1 tile through
shared memory), a config over the target's shared memory, register spills. The variants are the
launchers' own (``aot.record``: the public launchers driven over their options' domain, every
launch intercepted and specialised by the runtime's rules); nothing here lists a constexpr or a
config. It uses Triton's public compile API only, so it runs under Triton 3.6 (a CUDA 13 / torch
2.11 GPU image's) and the current 3.9 alike. From the repository root:

    python -m tools.compile_check                # the default subset (what `make test` runs)
    python -m tools.compile_check --full --out bench/results/compile-sm90-sm80

Binaries are cached in ``TRITON_CACHE_DIR`` (default ``~/.cache/mbf-lora/triton-<version>``) and
ptxas's register / spill report beside them, so a rerun takes seconds. Run it without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from tools.aot import SHARED_LIMIT, SPILL_LIMIT, Result, Variant, all_kernels, compile_variant, record

__all__ = ["main", "markdown", "select", "summary"]

# -- what to compile ------------------------------------------------------------------------------------


def _parts(v: Variant) -> tuple[dict[str, str], str]:
    """(constexprs, pointer dtypes + unit strides) of a variant label."""
    flags, _, rest = v.variant.partition("|")
    return dict(w.split("=", 1) for w in flags.split()), rest.strip()


def select(variants: list[Variant], full: bool) -> list[tuple[Variant, int]]:
    """(variant, cc) pairs to compile: everything on both targets, or the default subset.

    The subset covers, on sm_90, every combination of each kernel's boolean constexprs with each
    dtype class (16-bit, fp32, 16-bit with fp32 adapters; bf16 and fp16 alternate) and each operand
    layout, and every value of its other constexprs (R_PAD, PRECISION, dtype constants) at least
    once, each at its heaviest config (largest tiles x stages: the likeliest to run out of shared
    memory or registers); on sm_80 (less shared memory), the heaviest of them per kernel.
    """
    if full:
        return [(v, cc) for cc in (90, 80) for v in variants]
    heaviest: dict[tuple, Variant] = {}
    for v in variants:
        if v.group not in heaviest or v.weight > heaviest[v.group].weight:
            heaviest[v.group] = v
    groups: dict[tuple, list[Variant]] = {}
    for v in heaviest.values():
        flags, rest = _parts(v)
        booleans = tuple(sorted((k, x) for k, x in flags.items() if x in ("0", "1")))
        dtype_class = rest.replace("bf16", "16").replace("fp16", "16")
        groups.setdefault((v.kernel, booleans, dtype_class), []).append(v)

    def values(v: Variant) -> set:
        flags, rest = _parts(v)
        spread = {(v.kernel, k, x) for k, x in flags.items() if x not in ("0", "1")}
        return spread | {(v.kernel, "dtype", rest.split()[0] if rest else "")}  # bf16 and fp16 each

    seen: set = set()
    chosen: list[Variant] = []
    for candidates in groups.values():  # one per group: the one that covers the most unseen values
        best = max(candidates, key=lambda v: (len(values(v) - seen), v.weight))
        chosen.append(best)
        seen |= values(best)
    for v in sorted(heaviest.values(), key=lambda v: -v.weight):  # any value still unseen
        if values(v) - seen:
            chosen.append(v)
            seen |= values(v)
    per_kernel: dict[str, Variant] = {}
    for v in chosen:
        if v.kernel not in per_kernel or v.weight > per_kernel[v.kernel].weight:
            per_kernel[v.kernel] = v
    return [(v, 90) for v in chosen] + [(v, 80) for v in per_kernel.values()]


def _run_all(jobs: list[tuple[Variant, int]], workers: int, progress) -> list[Result]:
    if workers <= 1:
        out = []
        for i, (v, cc) in enumerate(jobs):
            out.append(compile_variant(v, cc))
            progress(i + 1, out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing

    global _JOBS
    _JOBS = jobs  # inherited by the forked workers: kernels are not picklable
    out: list[Result | None] = [None] * len(jobs)
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(_compile_job, i): i for i in range(len(jobs))}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            out[futures[fut]] = fut.result()
            progress(done, out[futures[fut]])
    return out


_JOBS: list = []


def _compile_job(i: int) -> Result:
    v, cc = _JOBS[i]
    return compile_variant(v, cc)


# -- reports --------------------------------------------------------------------------------------------


def summary(results: list[Result]) -> dict:
    """Counts, failures and the worst shared memory / registers / spills per target."""
    out = {}
    for cc in sorted({r.cc for r in results}, reverse=True):
        rs = [r for r in results if r.cc == cc]
        ok = [r for r in rs if r.ok]
        name = lambda r: f"{r.kernel} {r.variant} {r.config}"  # noqa: E731
        out[f"sm_{cc}"] = {
            "compiled": len(rs),
            "failed": [f"{name(r)}: {r.error}" for r in rs if not r.ok],
            "over_shared": [f"{name(r)}: {r.shared} B" for r in ok if r.shared > SHARED_LIMIT[cc]],
            "spilling": [f"{name(r)}: {r.spills} B" for r in ok if (r.spills or 0) > SPILL_LIMIT],
            "max_shared": max((r.shared for r in ok), default=0),
            "max_regs": max((r.regs or 0 for r in ok), default=0),
            "max_spills": max((r.spills or 0 for r in ok), default=0),
            "spills_total_variants": sum(1 for r in ok if r.spills),
            "seconds": round(sum(r.seconds for r in rs), 1),
        }
    return out


def markdown(results: list[Result], command: str, variants: int | None = None, date: str = "") -> str:
    """The compile table: one row per (kernel, variant, config), sm_90 and sm_80 side by side.

    ``variants``: how many the launchers produced, so that a table of fewer says what it left out;
    ``date``: the day it was produced (default today).
    """
    import datetime

    import triton

    date = date or datetime.date.today().isoformat()
    rows: dict[tuple, dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.variant, r.config), {})[r.cc] = r

    def cell(r: Result | None) -> str:
        if r is None:
            return "– | – | –"
        if not r.ok:
            return f"FAIL: {r.error[:60]} | | "
        flag = " ⚠" if not r.fits else ""
        return f"{r.shared:,}{flag} | {r.regs} | {r.spills}"

    lines = [
        "# Compile check: every Triton kernel variant for sm_90 and sm_80",
        "",
        f"Generated on {date} with Triton {triton.__version__} (its bundled ptxas; no GPU) by `{command}`.",
        *_coverage(results, variants),
        f"Shared memory is bytes per block (limits: sm_90 {SHARED_LIMIT[90]:,}, sm_80 {SHARED_LIMIT[80]:,}),",
        "registers per thread, spills in bytes of spill stores per thread; ⚠ marks a result over a limit",
        f"(spills > {SPILL_LIMIT} B).",
        "Nothing here is measured on a GPU: these are what the compiler allocates.",
        "",
        "## Summary",
        "",
        "```json",
        json.dumps(summary(results), indent=1, ensure_ascii=False),
        "```",
        "",
        "## Every variant",
        "",
        "| kernel | variant | config | sm_90 shared | regs | spills | sm_80 shared | regs | spills |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (kernel, variant, config), by_cc in rows.items():
        lines.append(f"| {kernel} | {variant} | {config} | {cell(by_cc.get(90))} | {cell(by_cc.get(80))} |")
    return "\n".join(lines) + "\n"


def _coverage(results: list[Result], variants: int | None) -> list[str]:
    """A line per target compiled for fewer than every variant (what the table leaves out)."""
    if variants is None:
        return []
    out = []
    for cc in (90, 80):
        done = sum(1 for r in results if r.cc == cc)
        if done < variants:
            out.append(f"**Partial:** sm_{cc}: {done:,} of the {variants:,} variant x config pairs compiled"
                       + (" (none: its columns read –)." if not done else "."))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("tools.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every variant x config on sm_90 and sm_80")
    parser.add_argument("--modules", default="lora,nf4,ortho,merge", help="launcher modules to drive")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this (all configs)")
    parser.add_argument("--match", default="", help="only variants with all these words (all configs)")
    parser.add_argument("--targets", default="90,80", help="compute capabilities to compile for")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--out", default="", help="write OUT.md (the table) and OUT.json (every result)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    from mbf.kernels import interpreting

    if interpreting():
        parser.error("unset TRITON_INTERPRET: the kernels must be real JIT functions to compile")
    start = time.perf_counter()
    modules = args.modules.split(",")
    variants = record(modules)
    words = args.match.split()
    labels = [f"{v.variant} {v.config}" for v in variants]
    picked = [v for v, s in zip(variants, labels) if args.kernel in v.kernel and all(w in s for w in words)]
    jobs = [(v, cc) for v, cc in select(picked, args.full or bool(args.kernel or words))
            if str(cc) in args.targets.split(",")]  # fmt: skip
    record_s = time.perf_counter() - start

    def progress(done: int, r: Result) -> None:
        if not args.quiet and (not r.fits or done % 50 == 0 or done == len(jobs)):
            state = "ok" if r.fits else ("FAIL " + r.error if not r.ok else "OVER")
            print(f"[{done}/{len(jobs)}] sm_{r.cc} {r.kernel} {r.variant} {r.config}: "
                  f"shared {r.shared} regs {r.regs} spills {r.spills} {state}", flush=True)  # fmt: skip

    results = _run_all(jobs, args.jobs, progress)
    report = summary(results)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m tools.compile_check " + " ".join(sys.argv[1:] if argv is None else argv)
        if os.environ.get("PYTHONPATH"):  # another Triton first on the path (make compile-subset's 3.6)
            command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
        out.with_suffix(".md").write_text(markdown(results, command.strip(), len(variants)))
        out.with_suffix(".json").write_text(json.dumps({
            "summary": report,
            "results": [{**dataclasses.asdict(r), "fits": r.fits} for r in results],
            "variants": [{"kernel": v.kernel, "variant": v.variant, "config": v.config} for v in variants],
            "kernels": all_kernels(modules),
        }, indent=0, ensure_ascii=False))  # fmt: skip
    times = {"variants": len(variants), "jobs": len(jobs), "record_s": round(record_s, 1)}
    print(json.dumps({**times, "total_s": round(time.perf_counter() - start, 1), **report}, indent=1))
    return 0 if all(r.fits for r in results) else 1


def _setup_environment() -> None:
    """A persistent compile cache per Triton version by default, and the FP-fusion default made explicit."""
    from importlib.metadata import version

    cache = Path.home() / ".cache" / "mbf-lora" / f"triton-{version('triton')}"
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the runtime uses; silences its warning


if __name__ == "__main__":
    _setup_environment()
    sys.exit(main())

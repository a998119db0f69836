"""``mbf demo``: SLAO, seq-lora and the multi-task bound on the real standard order, side by side, then
the comparison with its paired interval and a one-line verdict."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mbf.cli.shared import _load, _model_name, _qlora

__all__ = ["DEMO", "run_demo"]


# The demo's size: three methods on four tasks in under 5 minutes on 2 shared CPU cores (measured in
# the README). Fewer steps than `--preset quick`, shorter prompts (only the input is cut), smaller test
# sets; the training options are TrainOptions' defaults (lr 1e-3, batch 8) but these.
DEMO = {"n_train": 200, "max_length": 128, "methods": ("slao", "seq-lora", "multi-task")}


def _demo_suite(args) -> tuple[list, dict]:
    """The real standard order, or the generated domains suite when a data package is missing (said)."""
    from mbf.experiment.suites import MissingData, load_suite

    sizes = {"n_train": DEMO["n_train"], "n_test": args.n_test, "suite_seed": args.seed}
    if args.suite in ("auto", "real"):
        try:
            return load_suite("real", **sizes)
        except MissingData as e:
            if args.suite == "real":
                raise
            print(f"demo: the real suite's data is not installed ({e}); running the generated domains suite",
                  file=sys.stderr)  # fmt: skip
    return load_suite("domains", **sizes)


def _demo_method(args, run_dir: Path, tasks: list, meta: dict) -> None:
    """One method of the demo (``run_dir.name``) on a fresh base model: in a process of its own when
    the demo runs methods side by side."""
    from mbf.config import LoRAConfig
    from mbf.experiment.models import cache_dir, has_chat_template
    from mbf.experiment.run import run_continual
    from mbf.experiment.train import TrainOptions

    lora = LoRAConfig(quantize="nf4" if args.load_in_4bit else None)  # the default adapter: r 8 on q, v
    chat = has_chat_template(args.model)
    opts = TrainOptions(max_steps=args.max_steps, max_length=DEMO["max_length"], seed=args.seed,
                        prompt_format="chat" if chat else "plain")  # fmt: skip
    # inject() modifies the model in place: one per method
    model, codec = _load(args, _qlora(lora), prompt_format=opts.prompt_format)
    print(
        f"== {run_dir.name}: {meta['suite']} suite, {len(tasks)} tasks "
        f"({', '.join(t.name for t in tasks)}) -> {run_dir}",
        file=sys.stderr,
    )
    meta = {**meta, "model": _model_name(args)}
    run_continual(
        model, codec, tasks, run_dir, method=run_dir.name, lora=lora, opts=opts, resume=args.resume,
        meta=meta, zero_shot_cache=cache_dir() / "zero-shot",
    )  # fmt: skip


def _measured_dtype(args) -> argparse.Namespace:
    """``args`` with ``--dtype auto`` resolved once, here: every method loads its base in the one dtype
    measured (``mbf.experiment.cpu_dtype``), instead of the side-by-side processes each measuring at
    once (each timing the other's load too) and perhaps answering apart."""
    from mbf.experiment.cpu_dtype import SMOLLM2_SHAPES
    from mbf.experiment.models import checkpoint_shapes, resolve_dtype

    if args.dtype != "auto" or (args.model is not None and not (Path(args.model) / "config.json").is_file()):
        return args  # a missing checkpoint: each method fails on it with the error that names it
    shapes = SMOLLM2_SHAPES if args.model is None else checkpoint_shapes(args.model)
    dtype = str(resolve_dtype("auto", "cpu", shapes)).removeprefix("torch.")
    return argparse.Namespace(**{**vars(args), "dtype": dtype, "dtype_note": "measured"})


def run_demo(args) -> int:
    """SLAO, seq-lora and the multi-task bound on the real standard order (a fresh base model each),
    then the comparison.

    With ``--jobs 2`` (the default) SLAO and seq-lora train side by side, each in a process of its own
    with half the threads (their small GEMMs use one core nearly as well as two), then multi-task runs
    alone with every thread. Results are identical with ``--jobs 1`` (tested).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from mbf.experiment.report import compare_runs
    from mbf.experiment.rundir import check_out

    out, t_start = Path(args.out), time.time()
    tasks, meta = _demo_suite(args)
    runs = [out / m for m in DEMO["methods"]]
    for run_dir in runs:
        check_out(run_dir, args.resume)
    args = _measured_dtype(args)
    # the continual methods side by side, then the multi-task bound alone with every thread (it
    # would otherwise run on one thread while the other core idles)
    together, alone = (runs[: args.jobs], runs[args.jobs :]) if args.jobs > 1 else ([], runs)
    if together:
        threads = max(1, (args.threads or torch.get_num_threads()) // args.jobs)
        side_by_side = argparse.Namespace(**{**vars(args), "threads": threads})
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP pool
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for done in [pool.submit(_demo_method, side_by_side, r, tasks, meta) for r in together]:
                done.result()  # re-raises a method's error here
    for run_dir in alone:
        _demo_method(args, run_dir, tasks, meta)
    md, png = compare_runs(runs, out / "compare")
    print(md.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s ({meta['suite']} suite)")
    print(f"report: {md}  {png}")
    for r in runs:
        print(f"        {r / 'results.md'}  {r / 'accuracy.png'}")
    print(_demo_verdict(json.loads(md.with_suffix(".json").read_text())["intervals"], args, meta["suite"]))
    return 0


def _demo_verdict(intervals: dict, args, suite: str = "real") -> str:
    """One line: SLAO's AA gain over seq-lora with the demo's own paired interval, and whether it is
    outside it; where it is not, where the committed result is (and, on real text, the generated suite
    on which the demo's size does separate them)."""
    diff = (intervals.get("vs_baseline") or {}).get("slao", {}).get("AA")
    if diff is None:
        return "SLAO vs seq-lora: no paired interval (the runs saved no predictions)"
    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    interval = f"95% paired interval [{pts(diff['low'])}, {pts(diff['high'])}]"
    gain = f"SLAO − seq-lora: AA {pts(diff['estimate'])} points, {interval}"
    if diff["significant"]:
        return f"{gain}: distinguishable from 0 at the demo's size"
    size = f"{args.max_steps} steps, {args.n_test} test examples per task"
    domains = "; on the generated domains suite the demo's size separates them: mbf demo --suite domains"
    return (
        f"{gain}: not significant at the demo's size ({size}); the gain the committed seed-0 pair measured "
        "needs ~100 test examples and 30 steps per task, more than 5 minutes here (reports/REAL.md, 'The "
        "demo's size'); the committed result over several orders and seeds is in README 'Results'"
        + (domains if suite == "real" else "")
    )

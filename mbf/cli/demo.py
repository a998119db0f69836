"""``mbf demo``: InfLoRA, seq-lora and SLAO on real text where forgetting is large (dbpedia, then amazon,
which overwrites it), side by side, then the comparison with its paired intervals and a verdict on
each method's AA difference from seq-lora."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mbf.cli.shared import _load, _model_name, _qlora

__all__ = ["DEMO", "run_demo"]


# The demo's size: three methods on two real tasks in under 5 minutes on 2 CPU cores (measured in the
# README). dbpedia first, then amazon, the task that overwrites it most in the committed std1 runs, so
# that the forgetting InfLoRA avoids shows at this size; 96 training examples per task (12 steps of
# batch 8 see each once: InfLoRA's input statistics read no more than training does), 80 test examples
# per task, shorter prompts (only the input is cut). One rate for every method, TrainOptions' default
# (lr 1e-3, batch 8). InfLoRA, the slowest, is submitted first: it runs beside seq-lora then SLAO.
DEMO = {
    "n_train": 96,
    "max_length": 128,
    "order": "dbpedia,amazon",
    "methods": ("inflora", "seq-lora", "slao"),
    "baseline": "seq-lora",
}


def _demo_suite(args) -> tuple[list, dict]:
    """The demo's real tasks, or the generated domains suite when a data package is missing (said)."""
    from mbf.experiment.suites import MissingData, load_suite

    sizes = {"n_train": DEMO["n_train"], "n_test": args.n_test, "suite_seed": args.seed}
    if args.suite in ("auto", "real"):
        try:
            return load_suite("real", order=DEMO["order"], **sizes)
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
    """InfLoRA, seq-lora and SLAO on the demo's real tasks (a fresh base model each), then the
    comparison against seq-lora.

    With ``--jobs 2`` (the default) two processes of half the threads each (the small GEMMs use one
    core nearly as well as two) take the methods in turn: InfLoRA in one, seq-lora then SLAO in the
    other. Results are identical with ``--jobs 1`` (tested).
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
    if args.jobs > 1:
        threads = max(1, (args.threads or torch.get_num_threads()) // args.jobs)
        side_by_side = argparse.Namespace(**{**vars(args), "threads": threads})
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP pool
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for done in [pool.submit(_demo_method, side_by_side, r, tasks, meta) for r in runs]:
                done.result()  # re-raises a method's error here
    else:
        for run_dir in runs:
            _demo_method(args, run_dir, tasks, meta)
    md, png = compare_runs(runs, out / "compare", baseline=DEMO["baseline"])
    print(md.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s ({meta['suite']} suite)")
    print(f"report: {md}  {png}")
    for r in runs:
        print(f"        {r / 'results.md'}  {r / 'accuracy.png'}")
    for line in _demo_verdict(json.loads(md.with_suffix(".json").read_text())["intervals"], args):
        print(line)
    return 0


NAMES = {"inflora": "InfLoRA", "slao": "SLAO", "seq-lora": "seq-lora"}


def _demo_verdict(intervals: dict, args) -> list[str]:
    """One line per method against seq-lora: its AA difference with the demo's own paired interval, and
    whether the interval excludes 0 (said plainly where it does not, with where the committed result
    is); InfLoRA's line, the difference this size is chosen to resolve, first."""
    base = NAMES[DEMO["baseline"]]
    vs = intervals.get("vs_baseline") or {}
    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    size = f"{args.max_steps} steps, {args.n_test} test examples per task"
    lines = []
    for method in DEMO["methods"]:
        if method == DEMO["baseline"]:
            continue
        name, diff = NAMES[method], (vs.get(method) or {}).get("AA")
        if diff is None:
            lines.append(f"{name} vs {base}: no paired interval (the runs saved no predictions)")
            continue
        gain = (f"{name} − {base}: AA {pts(diff['estimate'])} points, 95% paired interval "
                f"[{pts(diff['low'])}, {pts(diff['high'])}]")  # fmt: skip
        bwt = (vs.get(method) or {}).get("BWT")
        if diff["significant"]:
            forgets = ""
            if bwt and bwt["significant"] and bwt["estimate"] > 0:  # the gain is less forgetting
                span = f"[{pts(bwt['low'])}, {pts(bwt['high'])}]"
                forgets = f" (BWT {pts(bwt['estimate'])} {span}: less forgetting)"
            lines.append(f"{gain}: distinguishable from 0 at the demo's size{forgets}")
        else:
            lines.append(
                f"{gain}: not significant at the demo's size ({size}); the committed result over "
                "several seeds and more steps is in README 'Results'"
            )
    return lines

"""The ``mbf`` subcommands: each turns its arguments into calls to ``mbf.experiment`` or ``mbf.bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from mbf.cli.parser import DEFAULT_MODEL

__all__ = ["COMMANDS"]


# -- what the commands share ---------------------------------------------------------------------------


def _tasks(args) -> tuple[list, dict]:
    """``load_suite`` of the suite arguments, after the checks of their combinations."""
    from mbf.experiment.suites import load_suite

    if args.suite == "olora" and not args.data_dir:
        raise SystemExit(
            "mbf: error: --suite olora needs --data-dir (the CL_Benchmark folder of O-LoRA or SAPT)"
        )
    if args.data_dir and args.suite not in ("olora", "real"):
        raise SystemExit(f"mbf: error: --data-dir needs --suite olora or real, not {args.suite}")
    return load_suite(
        args.suite,
        n_train=args.n_train,
        n_test=args.n_test,
        suite_seed=args.suite_seed,
        data_dir=args.data_dir,
        order=args.order,
    )


def _load(args, qlora: object = None):
    """``(model, Codec)``; with ``qlora`` (True, or the LoRAConfig to inject), a QLoRA base: every
    projection in NF4 but the config's targets, which inject quantises itself."""
    import torch
    from safetensors import SafetensorError

    from mbf.experiment.batches import Codec
    from mbf.experiment.models import SlowDtypeWarning, load_model, quantize_base

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlowDtypeWarning)
        try:
            model, tok = load_model(args.model, dtype=args.dtype)
        except SafetensorError as err:  # a damaged download: the message alone would not say which file
            raise ValueError(f"--model {args.model}: its weights cannot be read ({err})") from err
    for w in caught:  # the slow-dtype warning as one line; anything else as Python shows it
        if issubclass(w.category, SlowDtypeWarning):
            print(f"mbf: warning: --dtype {args.dtype}: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    name = args.model or f"{DEFAULT_MODEL} (embedded)"
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"model {name} loaded in {time.time() - t0:.1f} s ({dtype}, --dtype {args.dtype})", file=sys.stderr)
    if qlora:
        lora = None if qlora is True else qlora
        n = quantize_base(model, lora)
        later = " (+ the LoRA targets at inject)" if lora is not None else ""
        print(f"QLoRA base: {n} linears quantised to NF4{later}", file=sys.stderr)
    return model, Codec.from_tokenizer(tok)


def _lora(args, values: dict | None = None):
    """The ``LoRAConfig`` of ``--r --alpha --lora-dropout --target-modules --load-in-4bit`` (``values``:
    the resolved preset, else the quick preset under the flags)."""
    from mbf.config import LoRAConfig

    if values is None:
        values = _train_values(args)[1]
    targets = values["target_modules"]
    targets = targets if targets == "all-linear" else tuple(targets.split(","))
    return LoRAConfig(
        r=values["r"],
        alpha=values["alpha"],
        dropout=values["lora_dropout"],
        target_modules=targets,
        quantize="nf4" if args.load_in_4bit else None,
    )


_PRESET_KEYS = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_steps", "weight_decay",
                "max_length", "r", "alpha", "lora_dropout", "target_modules")  # fmt: skip


def _train_values(args, tasks: list | None = None) -> tuple[str, dict]:
    """``(preset applied, values)``: ``--preset``'s training values under the flags given."""
    from mbf.experiment.presets import resolve

    generation = bool(tasks) and all(t.metric == "rougeL" for t in tasks)
    given = {k: getattr(args, k, None) for k in _PRESET_KEYS}
    return resolve(given, getattr(args, "preset", "quick"), generation)


def _qlora(lora):
    """``_load``'s QLoRA argument for ``lora``: the config when it quantises, else None."""
    return lora if lora.quantize else None


def _model_name(args) -> str:
    """results.json's ``model``: the checkpoint's absolute path (a run is resumed or re-evaluated from
    anywhere), or the embedded model's name."""
    return os.path.abspath(args.model) if args.model else DEFAULT_MODEL


# -- commands -------------------------------------------------------------------------------------------


def cmd_continual(args) -> int:
    """``mbf continual``: one method on one suite; prints AA/BWT/FWT and where the report is."""
    from mbf.experiment.methods import method_config
    from mbf.experiment.models import cache_dir
    from mbf.experiment.run import run_continual, run_settings
    from mbf.experiment.rundir import check_out, check_resume, lock
    from mbf.experiment.train import TrainOptions

    # fail before loading anything: the method, the run directory, the data, the settings of a resume
    config = method_config(args.method, args.init, args.schedule, args.constant, args.orthogonal_updates)
    out = Path(args.out)
    check_out(out, args.resume)
    tasks, meta = _tasks(args)
    preset, values = _train_values(args, tasks)
    lora = _lora(args, values)
    opts = TrainOptions(
        lr=values["lr"],
        epochs=values["epochs"],
        max_steps=values["max_steps"] or None,
        batch_size=values["batch_size"],
        grad_accum=values["grad_accum"],
        eval_batch_size=args.eval_batch_size,
        max_length=values["max_length"],
        weight_decay=values["weight_decay"],
        warmup_steps=values["warmup_steps"],
        seed=args.seed,
    )
    meta = {**meta, "model": _model_name(args), "preset": preset}
    if args.resume:  # the model's own settings (dtype, weights) are checked once it is loaded
        check_resume(out, run_settings(args.method, config, tasks, lora, opts, meta), args.accept_changes)
    with lock(out):  # another process writing --out: said now, not after the model has loaded
        pass  # run_continual takes the lock for the run itself
    model, codec = _load(args, _qlora(lora))
    results = run_continual(
        model,
        codec,
        tasks,
        out,
        method=args.method,
        lora=lora,
        opts=opts,
        init=args.init,
        schedule=args.schedule,
        constant=args.constant,
        orthogonal_updates=args.orthogonal_updates,
        resume=args.resume,
        meta=meta,
        zero_shot_cache=cache_dir() / "zero-shot",
        accept_changes=args.accept_changes,
    )
    m = results["metrics"]
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    scores = f"AA {fmt(m['AA'])}%  BWT {fmt(m['BWT'])}  FWT {fmt(m.get('FWT'))} points"
    print(f"{args.method}: {scores}  ({m['wall_s']:.0f} s)")
    print(f"report: {out / 'results.md'}  {out / 'accuracy.png'}  {out / 'results.json'}")
    return 0


def cmd_compare(args) -> int:
    """``mbf compare``: prints compare.md and writes it with compare.png."""
    from mbf.experiment.report import compare_runs

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare"
    md, png = compare_runs(args.runs, out)
    print(md.read_text())
    print(f"comparison: {md}  {png}")
    return 0


def cmd_eval(args) -> int:
    """``mbf eval``: accuracy per task of a run's saved adapter (on the run's tasks), or of the bare model."""
    from mbf.config import LoRAConfig
    from mbf.experiment import results as results_file
    from mbf.experiment.evaluate import evaluate_tasks
    from mbf.experiment.tasks import tasks_fingerprint
    from mbf.experiment.train import TrainOptions

    checkpoint, qlora, trained = None, args.load_in_4bit, None
    if args.run:
        saved = results_file.read(args.run)
        if not saved.get("checkpoint"):
            why = "multi-task runs keep none" if saved.get("options") is None else "it trained no task yet"
            raise ValueError(f"{args.run} has no saved adapter ({why})")
        trained = set(saved["stages"])
        if not saved["complete"]:
            untrained = [t for t in saved["tasks"] if t not in trained]
            print(f"mbf: note: {args.run} is incomplete: {len(trained)} of {len(saved['tasks'])} tasks "
                  f"trained; not trained yet: {', '.join(untrained)} (scored as the adapter stands)",
                  file=sys.stderr)  # fmt: skip
        checkpoint = Path(args.run) / saved["checkpoint"]
        for key in ("suite", "suite_seed", "n_train", "n_test", "data_dir", "order"):  # the run's own tasks
            if key in saved:
                setattr(args, key, saved[key])
        args.max_length = saved["train"]["max_length"]  # the prompts the run was scored on
        if not args.model and saved.get("model") != DEFAULT_MODEL:
            args.model = saved.get("model")
        targets = saved["lora"]["target_modules"]
        saved_lora = LoRAConfig(target_modules=targets, quantize=saved["lora"].get("quantize"))
        qlora = _qlora(saved_lora)  # the run's base, as it was trained
    tasks, _ = _tasks(args)
    if args.run and saved.get("data_fingerprint") not in (None, tasks_fingerprint(tasks)):
        print(f"mbf: warning: the run's tasks now hold other examples than {args.run} used (its data changed "
              "since): the scores below are on today's", file=sys.stderr)  # fmt: skip
    model, codec = _load(args, qlora)
    opts = TrainOptions(eval_batch_size=args.eval_batch_size, max_length=args.max_length)
    accs = evaluate_tasks(model, codec, tasks, opts, checkpoint=checkpoint, adapter=args.adapter)
    seen = [a for t, a in zip(tasks, accs) if trained is None or t.name in trained]
    for t, a in zip(tasks, accs):
        print(f"{t.name:>12s}  {100 * a:5.1f}%" + ("" if trained is None or t.name in trained else
                                                  "  (not trained yet)"))  # fmt: skip
    note = "" if len(seen) == len(accs) else f"  (over the {len(seen)} trained tasks of {len(accs)})"
    print(f"{'mean':>12s}  {100 * sum(seen) / len(seen):5.1f}%{note}")
    return 0


# The demo's size: three methods on four tasks in under 5 minutes on 2 shared CPU cores (measured in
# the README). Fewer steps than `--preset quick`, shorter prompts (only the input is cut), smaller test sets.
DEMO = {
    "n_train": 200,
    "lr": 1e-3,
    "batch_size": 8,
    "max_length": 128,
    "methods": ("slao", "seq-lora", "multi-task"),
}


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
    from mbf.experiment.models import cache_dir
    from mbf.experiment.run import run_continual
    from mbf.experiment.train import TrainOptions

    lora = LoRAConfig(quantize="nf4" if args.load_in_4bit else None)  # the default adapter: r 8 on q, v
    opts = TrainOptions(
        lr=DEMO["lr"], max_steps=args.max_steps, batch_size=DEMO["batch_size"], max_length=DEMO["max_length"],
        seed=args.seed,
    )  # fmt: skip
    model, codec = _load(args, _qlora(lora))  # inject() modifies the model in place: one per method
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


def cmd_demo(args) -> int:
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
    return 0


def cmd_bench(args) -> int:
    """``mbf bench``: ``mbf.bench.suite.main`` with the same flags."""
    from mbf.bench.suite import main as bench_main

    argv = (["--out", args.out] if args.out else []) + ["--quick"] * args.quick + ["--dtype", args.dtype]
    return bench_main(argv + ["--no-boundary"] * args.no_boundary)


COMMANDS = {
    "continual": cmd_continual,
    "compare": cmd_compare,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "bench": cmd_bench,
}

"""The ``mbf`` subcommands: each turns its arguments into calls to ``mbf.experiment`` or ``mbf.bench``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from mbf.cli.parser import DEFAULT_MODEL

__all__ = ["COMMANDS"]


# -- what the commands share ---------------------------------------------------------------------------


def _tasks(args) -> tuple[list, dict]:
    """``load_suite`` of the suite arguments, after the checks of their combinations."""
    from mbf.experiment.tasks import load_suite

    if args.suite == "builtin" and args.data_dir:
        raise SystemExit("mbf: error: --data-dir needs --suite olora")
    if args.suite == "olora" and not args.data_dir:
        raise SystemExit(
            "mbf: error: --suite olora needs --data-dir (the CL_Benchmark folder of O-LoRA or SAPT)"
        )
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

    from mbf.experiment.batches import Codec
    from mbf.experiment.models import SlowDtypeWarning, load_model, quantize_base

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SlowDtypeWarning)
        model, tok = load_model(args.model, dtype=args.dtype)
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


def _lora(args):
    """The ``LoRAConfig`` of ``--r --alpha --target-modules --load-in-4bit``."""
    from mbf.config import LoRAConfig

    targets = args.target_modules
    targets = targets if targets == "all-linear" else tuple(targets.split(","))
    return LoRAConfig(
        r=args.r, alpha=args.alpha, target_modules=targets, quantize="nf4" if args.load_in_4bit else None
    )


def _qlora(lora):
    """``_load``'s QLoRA argument for ``lora``: the config when it quantises, else None."""
    return lora if lora.quantize else None


def _refuse_existing(run_dir: Path, resume: bool) -> None:
    if (run_dir / "results.json").exists() and not resume:
        raise SystemExit(
            f"mbf: error: {run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )


# -- commands -------------------------------------------------------------------------------------------


def cmd_continual(args) -> int:
    """``mbf continual``: one method on one suite; prints AA/BWT and where the report is."""
    from mbf.experiment.methods import method_config
    from mbf.experiment.run import run_continual
    from mbf.experiment.train import TrainOptions

    method_config(args.method, args.init, args.schedule, args.constant)  # fail before loading anything
    lora, out = _lora(args), Path(args.out)
    _refuse_existing(out, args.resume)
    tasks, meta = _tasks(args)
    model, codec = _load(args, _qlora(lora))
    opts = TrainOptions(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps or None,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )
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
        resume=args.resume,
        meta={**meta, "model": args.model or DEFAULT_MODEL},
    )
    m = results["metrics"]
    bwt = "–" if m["BWT"] is None else f"{100 * m['BWT']:.1f}"
    print(f"{args.method}: AA {100 * m['AA']:.1f}%  BWT {bwt} points  ({m['wall_s']:.0f} s)")
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
    from mbf.experiment.train import TrainOptions

    checkpoint, qlora = None, args.load_in_4bit
    if args.run:
        saved = results_file.read(args.run)
        if not saved.get("checkpoint"):
            raise SystemExit(f"mbf: error: {args.run} has no saved adapter (multi-task runs keep none)")
        checkpoint = Path(args.run) / saved["checkpoint"]
        for key in ("suite", "suite_seed", "n_train", "n_test", "data_dir", "order"):  # the run's own tasks
            if key in saved:
                setattr(args, key, saved[key])
        if not args.model and saved.get("model") != DEFAULT_MODEL:
            args.model = saved.get("model")
        targets = saved["lora"]["target_modules"]
        saved_lora = LoRAConfig(target_modules=targets, quantize=saved["lora"].get("quantize"))
        qlora = _qlora(saved_lora)  # the run's base, as it was trained
    tasks, _ = _tasks(args)
    model, codec = _load(args, qlora)
    opts = TrainOptions(eval_batch_size=args.eval_batch_size, max_length=args.max_length)
    accs = evaluate_tasks(model, codec, tasks, opts, checkpoint=checkpoint, adapter=args.adapter)
    for t, a in zip(tasks, accs):
        print(f"{t.name:>12s}  {100 * a:5.1f}%")
    print(f"{'mean':>12s}  {100 * sum(accs) / len(accs):5.1f}%")
    return 0


def _demo_method(args, run_dir: Path) -> None:
    """One method of the demo (``run_dir.name``) on a fresh base model: in a process of its own when
    the demo runs the two side by side."""
    from mbf.config import LoRAConfig
    from mbf.experiment.run import run_continual
    from mbf.experiment.tasks import load_suite
    from mbf.experiment.train import TrainOptions

    tasks, meta = load_suite("builtin", n_train=300, n_test=args.n_test)
    lora = LoRAConfig(quantize="nf4" if args.load_in_4bit else None)  # the default adapter
    opts = TrainOptions(lr=1e-3, max_steps=args.max_steps, batch_size=8, seed=args.seed)
    model, codec = _load(args, _qlora(lora))  # inject() modifies the model in place: one per method
    print(
        f"== {run_dir.name}: {len(tasks)} tasks ({', '.join(t.name for t in tasks)}) -> {run_dir}",
        file=sys.stderr,
    )
    meta["model"] = args.model or DEFAULT_MODEL
    run_continual(
        model, codec, tasks, run_dir, method=run_dir.name, lora=lora, opts=opts, resume=args.resume, meta=meta
    )


def cmd_demo(args) -> int:
    """SLAO and seq-lora on the built-in suite, a fresh base model each, then the comparison.

    With ``--jobs 2`` (the default) the two methods train side by side, each in a process of its own
    with half the threads: their small GEMMs use one core nearly as well as two, so on a 2-core CPU
    the pair finishes sooner than one after the other.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from mbf.experiment.report import compare_runs

    out, t_start = Path(args.out), time.time()
    runs = [out / "slao", out / "seq-lora"]
    for run_dir in runs:
        _refuse_existing(run_dir, args.resume)
    if args.jobs == 1:
        for run_dir in runs:
            _demo_method(args, run_dir)
    else:
        threads = max(1, (args.threads or torch.get_num_threads()) // len(runs))
        side_by_side = argparse.Namespace(**{**vars(args), "threads": threads})
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP pool
        with ProcessPoolExecutor(len(runs), mp_context=spawn) as pool:
            for done in [pool.submit(_demo_method, side_by_side, run_dir) for run_dir in runs]:
                done.result()  # re-raises a method's error here
    md, png = compare_runs(runs, out / "compare")
    print(md.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s")
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

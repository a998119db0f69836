"""The ``mbf`` command.

mbf continual --suite builtin --method slao --out runs/slao       # one continual run
mbf continual --suite olora --data-dir CL_Benchmark --order O1 --method slao --out runs/o1
mbf compare runs/slao runs/seq --out runs/compare                  # methods side by side
mbf eval --run runs/slao                                           # re-evaluate a saved adapter
mbf demo                                                           # SLAO vs seq-lora, ~5-10 min on CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main"]


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be a positive integer")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s} must be >= 0")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{s} must be > 0")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face Llama checkpoint dir (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: the base's projection linears in NF4 (4-bit)"
    )
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--suite",
        choices=("builtin", "olora"),
        default="builtin",
        help="builtin: 5 generated tasks; olora: the O-LoRA/SAPT benchmark from --data-dir",
    )
    p.add_argument(
        "--data-dir", default=None, help="root of the O-LoRA/SAPT CL_Benchmark folders (--suite olora)"
    )
    p.add_argument(
        "--order", default="O1", help="task order O1..O6, or comma-separated task names (--suite olora)"
    )
    p.add_argument("--suite-seed", type=int, default=0, help="seed of the generated built-in tasks")
    p.add_argument("--n-train", type=_positive_int, default=300, help="training examples per task (at most)")
    p.add_argument("--n-test", type=_positive_int, default=100, help="test examples per task (at most)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and adapter init")
    g.add_argument("--lr", type=_positive_float, default=1e-3)
    g.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over each task's training set")
    g.add_argument(
        "--max-steps", type=_non_negative_int, default=20, help="cap on optimizer steps per task (0: no cap)"
    )
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--eval-batch-size", type=_positive_int, default=50)
    g.add_argument("--max-length", type=_positive_int, default=256, help="prompt tokens kept per example")
    g.add_argument("--r", type=_positive_int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=_positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    g.add_argument(
        "--target-modules", default="q_proj,v_proj", help="comma-separated linear names, or all-linear"
    )


def build_parser() -> argparse.ArgumentParser:
    from mbf.continual import INITS
    from mbf.reference import SCHEDULES
    from mbf.train import METHODS

    parser = argparse.ArgumentParser(
        prog="mbf", description="Continual LoRA fine-tuning with one adapter (SLAO)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("continual", help="train a task sequence with one method; writes OUT/results.json")
    c.add_argument("--method", choices=list(METHODS), default="slao")
    c.add_argument("--out", required=True, help="run directory")
    c.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last finished task"
    )
    c.add_argument("--schedule", choices=SCHEDULES, default=None, help="override the method's λ schedule")
    c.add_argument("--init", choices=INITS, default=None, help="override the method's task-init")
    c.add_argument("--constant", type=float, default=0.5, help="λ of --schedule constant")
    _add_suite_args(c)
    _add_model_args(c)
    _add_train_args(c)

    cmp = sub.add_parser("compare", help="draw runs side by side (AA/BWT bars, per-task curves)")
    cmp.add_argument("runs", nargs="+", help="run directories (or their results.json)")
    cmp.add_argument("--out", default=None, help="output dir (default: beside the first run, 'compare')")

    e = sub.add_parser("eval", help="evaluate a run's merged adapter (or the bare model) on a suite")
    e.add_argument("--run", default=None, help="run directory: its checkpoint and its tasks")
    e.add_argument("--adapter", choices=("merged", "finetuned"), default="merged")
    _add_suite_args(e)
    _add_model_args(e)
    e.add_argument("--eval-batch-size", type=_positive_int, default=50)
    e.add_argument("--max-length", type=_positive_int, default=256)

    d = sub.add_parser("demo", help="SLAO and seq-lora on the built-in suite with SmolLM2, then a comparison")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-test", type=_positive_int, default=50)
    d.add_argument("--max-steps", type=_positive_int, default=20)
    d.add_argument("--resume", action="store_true")
    _add_model_args(d)

    b = sub.add_parser("bench", help="training-step and task-boundary benchmark that fits this machine")
    b.add_argument("--out", default=None, help="results JSON (default bench/results/<device>-<date>.json)")
    b.add_argument("--quick", action="store_true", help="the CPU set even on CUDA")
    b.add_argument("--no-boundary", action="store_true", help="skip the task-boundary benchmark")
    return parser


# -- commands -------------------------------------------------------------------------------------------


def _load(args):
    import torch

    from mbf.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct (embedded)'} loaded in {time.time() - t0:.1f} s",
        file=sys.stderr,
    )
    return model, tok


def _tasks(args) -> tuple[list, dict]:
    from mbf.tasks import builtin_suite, load_benchmark

    if args.suite == "builtin":
        if args.data_dir:
            raise SystemExit("mbf: error: --data-dir needs --suite olora")
        tasks = builtin_suite(args.suite_seed, n_train=args.n_train, n_test=args.n_test)
        return tasks, {
            "suite": "builtin",
            "suite_seed": args.suite_seed,
            "n_train": args.n_train,
            "n_test": args.n_test,
        }
    if not args.data_dir:
        raise SystemExit(
            "mbf: error: --suite olora needs --data-dir (the CL_Benchmark folder of O-LoRA or SAPT)"
        )
    order = args.order.split(",") if "," in args.order else args.order
    tasks = load_benchmark(args.data_dir, order, max_train=args.n_train, max_test=args.n_test)
    return tasks, {
        "suite": "olora",
        "order": args.order,
        "data_dir": str(args.data_dir),
        "n_train": args.n_train,
        "n_test": args.n_test,
    }


def _opts(args):
    from mbf.train import TrainOptions

    return TrainOptions(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps or None,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )


def _lora(args):
    from mbf.config import LoRAConfig

    targets = (
        args.target_modules if args.target_modules == "all-linear" else tuple(args.target_modules.split(","))
    )
    quantize = "nf4" if args.load_in_4bit else None
    return LoRAConfig(r=args.r, alpha=args.alpha, target_modules=targets, quantize=quantize)


def _quantize(model, lora) -> None:
    """QLoRA: the non-target linears to NF4 now; inject() quantises the targets (lora.quantize)."""
    from mbf.models import quantize_base

    n = quantize_base(model, skip=lora.targets())
    print(f"QLoRA base: {n} linears quantised to NF4 (+ the LoRA targets at inject)", file=sys.stderr)


def cmd_continual(args) -> int:
    from mbf.train import Codec, method_options, run_continual

    method_options(args.method, args.init, args.schedule, args.constant)  # fail before loading anything
    lora = _lora(args)
    out = Path(args.out)
    if (out / "results.json").exists() and not args.resume:
        raise SystemExit(
            f"mbf: error: {out} already holds a run; pass --resume to continue it or choose another --out"
        )
    tasks, meta = _tasks(args)
    model, tok = _load(args)
    if lora.quantize:
        _quantize(model, lora)
    meta["model"] = args.model or "SmolLM2-135M-Instruct"
    results = run_continual(
        model,
        Codec.from_tokenizer(tok),
        tasks,
        out,
        method=args.method,
        lora=lora,
        opts=_opts(args),
        init=args.init,
        schedule=args.schedule,
        constant=args.constant,
        resume=args.resume,
        meta=meta,
    )
    m = results["metrics"]
    bwt = "–" if m["BWT"] is None else f"{100 * m['BWT']:.1f}"
    print(f"{args.method}: AA {100 * m['AA']:.1f}%  BWT {bwt} points  ({m['wall_s']:.0f} s)")
    print(f"report: {out / 'results.md'}  {out / 'accuracy.png'}  {out / 'results.json'}")
    return 0


def cmd_compare(args) -> int:
    from mbf.report import compare_runs

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare"
    md, png = compare_runs(args.runs, out)
    print(md.read_text())
    print(f"comparison: {md}  {png}")
    return 0


def cmd_eval(args) -> int:
    from mbf.continual import ContinualLoRA
    from mbf.report import read_results
    from mbf.train import Codec, TrainOptions, evaluate

    saved_lora = None
    if args.run:
        saved = read_results(args.run)
        saved_lora = saved["lora"]
        if not saved.get("checkpoint"):
            raise SystemExit(f"mbf: error: {args.run} has no saved adapter (multi-task runs keep none)")
        for key in ("suite", "suite_seed", "n_train", "n_test", "data_dir", "order"):
            if key in saved:
                setattr(args, key.replace("-", "_"), saved[key])
        args.model = args.model or (
            None if saved.get("model") == "SmolLM2-135M-Instruct" else saved.get("model")
        )
    tasks, _ = _tasks(args)
    model, tok = _load(args)
    if saved_lora and saved_lora.get("quantize") == "nf4":  # the run's QLoRA base, as it was trained
        from mbf.config import LoRAConfig

        targets = saved_lora["target_modules"]
        _quantize(model, LoRAConfig(target_modules=targets if isinstance(targets, str) else tuple(targets)))
    elif args.load_in_4bit and not args.run:
        from mbf.models import quantize_base

        quantize_base(model)
    opts = TrainOptions(eval_batch_size=args.eval_batch_size, max_length=args.max_length)
    codec = Codec.from_tokenizer(tok)
    if args.run:
        cl = ContinualLoRA.load(model, Path(args.run) / saved["checkpoint"])
        mode = cl.merged() if args.adapter == "merged" else cl.adapter_mode("finetuned")
        with mode:
            accs = [evaluate(model, codec, t, opts) for t in tasks]
    else:
        accs = [evaluate(model, codec, t, opts) for t in tasks]
    for t, a in zip(tasks, accs):
        print(f"{t.name:>12s}  {100 * a:5.1f}%")
    print(f"{'mean':>12s}  {100 * sum(accs) / len(accs):5.1f}%")
    return 0


def cmd_demo(args) -> int:
    """SLAO and seq-lora on the built-in suite, one model load, then the comparison."""
    from mbf.config import LoRAConfig
    from mbf.models import load_model  # noqa: F401  (fail early with the install hint)
    from mbf.report import compare_runs
    from mbf.tasks import builtin_suite
    from mbf.train import Codec, TrainOptions, run_continual

    out = Path(args.out)
    t_start = time.time()
    tasks = builtin_suite(0, n_train=300, n_test=args.n_test)
    runs = []
    for method in ("slao", "seq-lora"):
        run_dir = out / method
        if (run_dir / "results.json").exists() and not args.resume:
            raise SystemExit(f"mbf: error: {run_dir} exists; pass --resume or another --out")
        model, tok = _load(args)  # a fresh base model per method: inject() modifies it in place
        lora = LoRAConfig(quantize="nf4" if args.load_in_4bit else None)
        if lora.quantize:
            _quantize(model, lora)
        print(
            f"== {method}: {len(tasks)} tasks ({', '.join(t.name for t in tasks)}) -> {run_dir}",
            file=sys.stderr,
        )
        opts = TrainOptions(lr=1e-3, max_steps=args.max_steps, batch_size=8, seed=args.seed)
        run_continual(
            model,
            Codec.from_tokenizer(tok),
            tasks,
            run_dir,
            method=method,
            lora=lora,
            opts=opts,
            resume=args.resume,
            meta={
                "suite": "builtin",
                "suite_seed": 0,
                "n_train": 300,
                "n_test": args.n_test,
                "model": args.model or "SmolLM2-135M-Instruct",
            },
        )
        runs.append(run_dir)
        del model
    md, png = compare_runs(runs, out / "compare")
    print(md.read_text())
    print(f"demo finished in {time.time() - t_start:.0f} s")
    print(f"report: {md}  {png}")
    for r in runs:
        print(f"        {r / 'results.md'}  {r / 'accuracy.png'}")
    return 0


def cmd_bench(args) -> int:
    from mbf.bench.suite import main as bench_main

    argv = (["--out", args.out] if args.out else []) + ["--quick"] * args.quick
    return bench_main(argv + ["--no-boundary"] * args.no_boundary)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP threads that spin while they wait make a shared CPU crawl: a SmolLM2 training step
        # took 3-26 s instead of 0.9 s with other processes on 2 cores. libgomp reads the policy
        # once, when torch loads it, and `import mbf` has loaded torch by now: so the command
        # restarts itself once with the policy set (OMP_WAIT_POLICY=ACTIVE in the environment opts out).
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "mbf.cli", *sys.argv[1:]], env)
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "continual": cmd_continual,
            "compare": cmd_compare,
            "eval": cmd_eval,
            "demo": cmd_demo,
            "bench": cmd_bench,
        }
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"mbf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

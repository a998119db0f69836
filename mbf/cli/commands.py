"""The ``mbf`` subcommands: each turns its arguments into calls to ``mbf.experiment`` or ``mbf.bench``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mbf.cli.demo import run_demo
from mbf.cli.parser import DEFAULT_MODEL
from mbf.cli.shared import _load, _model_name, _options, _preset, _qlora, _tasks

__all__ = ["COMMANDS"]


# -- commands -------------------------------------------------------------------------------------------


def cmd_continual(args) -> int:
    """``mbf continual``: one method on one suite; prints AA/BWT/FWT and where the report is."""
    from mbf.experiment.methods import method_config
    from mbf.experiment.models import cache_dir
    from mbf.experiment.run import run_continual, run_settings
    from mbf.experiment.rundir import check_out, check_resume, lock

    # fail before loading anything: the method, the run directory, the data, the settings of a resume
    config = method_config(
        args.method,
        init=args.init,
        schedule=args.schedule,
        constant=args.constant,
        orthogonal_updates=args.orthogonal_updates,
        options=_options(args.option),
    )
    out = Path(args.out)
    check_out(out, args.resume)
    tasks, meta = _tasks(args)
    preset = _preset(args, tasks)
    meta = {**meta, "model": _model_name(args), "preset": preset.name}
    run = dict(method=args.method, config=config, lora=preset.lora, opts=preset.train, meta=meta)
    if args.resume:  # the model's own settings (dtype, weights) are checked once it is loaded
        check_resume(out, run_settings(tasks=tasks, **run), args.accept_changes)
    with lock(out, for_callees=True):  # from before the model loads to the end (run_continual's lock)
        model, codec = _load(args, _qlora(preset.lora), prompt_format=preset.train.prompt_format)
        results = run_continual(
            model,
            codec,
            tasks,
            out,
            **run,
            resume=args.resume,
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
    """``mbf compare``: prints compare.md and writes it with compare.png and memory.png."""
    from mbf.experiment.report import compare_runs

    seen: dict[str, str] = {}
    for given in args.runs:  # a run directory or its results.json: one run counted twice is not two seeds
        path = Path(given)
        key = os.path.realpath(path.parent if path.name == "results.json" else path)
        if key in seen:
            raise ValueError(f"{given}: the same run as {seen[key]} (given twice); each run counts once")
        seen[key] = given
    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "compare"
    baseline = None if args.baseline == "none" else args.baseline
    md, png = compare_runs(args.runs, out, baseline=baseline, scorer=args.scorer)
    print(md.read_text())
    print(f"comparison: {md}  {md.with_suffix('.json')}  {png}  {md.parent / 'memory.png'}")
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
        if not checkpoint.is_dir():  # results.json and predictions travel without it (the committed sweeps)
            raise FileNotFoundError(
                f"{args.run}: results.json names the adapter state {saved['checkpoint']}, which is missing "
                "(was the run copied without its checkpoints/? the committed sweep runs keep only their "
                "results and predictions): its adapter cannot be re-evaluated; `mbf report` and `mbf "
                "compare` read the saved scores"
            )
        from mbf.experiment.rundir import check_checkpoint

        check_checkpoint(args.run, saved)  # this run's adapter, saved between tasks: not one copied in
        for key in ("suite", "order"):  # given with --run: they must be the run's own
            given = getattr(args, key, None)
            if given is not None and key in saved and given != saved[key]:
                raise ValueError(f"--{key} {given}: the run was trained on the {saved[key]} {key}; --run "
                                 f"evaluates on the run's own tasks (drop --{key})")  # fmt: skip
        split, given = results_file.eval_split(saved), getattr(args, "eval_split", None)
        if given is not None and given != split:
            raise ValueError(f"--eval-split {given}: the run is scored on the {split} split; --run "
                             "evaluates on the run's own examples (drop --eval-split)")  # fmt: skip
        for key in ("suite", "suite_seed", "n_train", "n_test", "data_dir", "order", "eval_split"):
            if key in saved:
                setattr(args, key, saved[key])
        if args.dtype == "auto":  # the base the run trained on (older files: float32)
            args.dtype, args.dtype_note = results_file.base_dtype(saved), "the run's"
        elif args.dtype != (trained_in := results_file.base_dtype(saved)):
            print(f"mbf: note: {args.run} trained on a {trained_in} base; scored here in {args.dtype} "
                  "(--dtype): the scores may differ from its own", file=sys.stderr)  # fmt: skip
        args.max_length = saved["train"]["max_length"]  # the prompts the run was scored on, as written
        args.prompt_format = saved["train"].get("prompt_format", "plain")  # older runs: plain
        if not args.model and saved.get("model") != DEFAULT_MODEL:
            args.model = saved.get("model")
        targets = saved["lora"]["target_modules"]
        saved_lora = LoRAConfig(target_modules=targets, quantize=saved["lora"].get("quantize"))
        qlora = _qlora(saved_lora)  # the run's base, as it was trained
    args.suite = args.suite or "real"
    tasks, meta = _tasks(args)
    if meta.get("eval_split") == "validation":
        print("mbf: note: scored on held-out training examples (--eval-split validation), not the test split",
              file=sys.stderr)  # fmt: skip
    if args.run and saved.get("data_fingerprint") not in (None, tasks_fingerprint(tasks)):
        print(f"mbf: warning: the run's tasks now hold other examples than {args.run} used (its data changed "
              "since): the scores below are on today's", file=sys.stderr)  # fmt: skip
    if args.prompt_format == "auto":
        from mbf.experiment.models import has_chat_template

        args.prompt_format = "chat" if has_chat_template(args.model) else "plain"
    opts = TrainOptions(eval_batch_size=args.eval_batch_size or 50, max_length=args.max_length,
                        scoring=args.scoring or "generate", prompt_format=args.prompt_format)  # fmt: skip
    model, codec = _load(args, qlora, prompt_format=opts.prompt_format)
    if args.run:
        _note_another_model(args, saved, model)
    accs = evaluate_tasks(model, codec, tasks, opts, checkpoint=checkpoint, adapter=args.adapter)
    seen = [a for t, a in zip(tasks, accs) if trained is None or t.name in trained]
    for t, a in zip(tasks, accs):
        print(f"{t.name:>12s}  {100 * a:5.1f}%" + ("" if trained is None or t.name in trained else
                                                  "  (not trained yet)"))  # fmt: skip
    note = "" if len(seen) == len(accs) else f"  (over the {len(seen)} trained tasks of {len(accs)})"
    print(f"{'mean':>12s}  {100 * sum(seen) / len(seen):5.1f}%{note}")
    return 0


def _note_another_model(args, saved: dict, model) -> None:
    """``mbf eval --run R --model OTHER``: a note (as another ``--dtype`` gets) when the loaded weights are
    not the ones the run trained: its ``model_fingerprint`` differs (the same weights at another path
    are the run's model); without a fingerprint to compare (an older run, or another ``--dtype``, noted
    already), when the path differs."""
    from mbf.experiment import results as results_file

    was, recorded = saved.get("model"), saved.get("model_fingerprint")
    if isinstance(recorded, str) and args.dtype == results_file.base_dtype(saved):
        from mbf.experiment.zero_shot import weights_fingerprint

        differs = weights_fingerprint(model, legacy=":" not in recorded) != recorded
    else:
        differs = was is not None and _model_name(args) != was
    if differs:
        given = args.model or DEFAULT_MODEL
        print(f"mbf: note: {args.run} trained on {was}; scored here with --model {given}, other weights: "
              "the scores may differ from its own", file=sys.stderr)  # fmt: skip


def cmd_bench(args) -> int:
    """``mbf bench``: ``mbf.bench.suite.main`` with the same flags."""
    from mbf.bench.suite import main as bench_main

    argv = (["--out", args.out] if args.out else []) + ["--quick"] * args.quick + ["--dtype", args.dtype]
    return bench_main(argv + ["--no-boundary"] * args.no_boundary)


def cmd_sweep(args) -> int:
    """``mbf sweep``: ``mbf.experiment.sweep.run_sweep`` with the same arguments."""
    from mbf.experiment.sweep import run_sweep

    return run_sweep(args.config, stage=args.stage, dry_run=args.dry_run, jobs=args.jobs, only=args.only)


COMMANDS = {
    "continual": cmd_continual,
    "compare": cmd_compare,
    "eval": cmd_eval,
    "demo": run_demo,
    "bench": cmd_bench,
    "sweep": cmd_sweep,
}

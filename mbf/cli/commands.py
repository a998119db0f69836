"""The ``mbf`` subcommands: each turns its arguments into calls to ``mbf.experiment`` or ``mbf.bench``."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

from mbf.cli.parser import DEFAULT_MODEL

__all__ = ["COMMANDS"]


# -- what the commands share ---------------------------------------------------------------------------


def _tasks(args) -> tuple[list, dict]:
    """``load_suite`` of the suite arguments (it checks their combinations). The suite seed follows
    ``--seed`` unless ``--suite-seed`` pins it: seeds then replicate the experiment, data included."""
    from mbf.experiment.suites import load_suite

    suite_seed = args.suite_seed if args.suite_seed is not None else getattr(args, "seed", 0)
    return load_suite(
        args.suite,
        n_train=args.n_train,
        n_test=args.n_test,
        suite_seed=suite_seed,
        data_dir=args.data_dir,
        order=args.order,
        split=getattr(args, "eval_split", None) or "test",
    )


def _load(args, qlora: object = None, *, prompt_format: str = "plain"):
    """``(model, Codec)``; with ``qlora`` (True, or the LoRAConfig to inject), a QLoRA base: every
    projection in NF4 but the config's targets, which inject quantises itself. ``prompt_format``
    ``"chat"``: the codec writes prompts inside the tokenizer's chat template."""
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
    asked = "auto: " + args.dtype_note if getattr(args, "dtype_note", None) else args.dtype
    print(f"model {name} loaded in {time.time() - t0:.1f} s ({dtype}, --dtype {asked})", file=sys.stderr)
    if qlora:
        lora = None if qlora is True else qlora
        n = quantize_base(model, lora)
        later = " (+ the LoRA targets at inject)" if lora is not None else ""
        print(f"QLoRA base: {n} linears quantised to NF4{later}", file=sys.stderr)
    return model, Codec.from_tokenizer(tok, chat=prompt_format == "chat")


# the flag of each LoRAConfig field, to name it in LoRAConfig's own range errors
_LORA_FLAGS = {"r": "--r", "alpha": "--alpha", "dropout": "--lora-dropout",
               "target_modules": "--target-modules"}  # fmt: skip


def _preset(args, tasks: list | None = None):
    """The ``Preset`` of ``--preset`` with the training and LoRA flags given on top, built once: its
    ``train`` and ``lora`` go to the run as they are.

    Raises:
        ValueError: a flag's value that TrainOptions or LoRAConfig refuses, naming the flag.
    """
    from mbf.experiment.presets import preset

    generation = bool(tasks) and all(t.metric == "rougeL" for t in tasks)
    targets = getattr(args, "target_modules", None)
    if targets is not None and targets != "all-linear":
        targets = tuple(targets.split(","))
    max_steps = getattr(args, "max_steps", None)
    given = {name: getattr(args, name, None) for name in _TRAIN_FLAGS}
    if given["prompt_format"] == "auto":
        from mbf.experiment.models import has_chat_template

        given["prompt_format"] = "chat" if has_chat_template(args.model) else "plain"
    try:
        return preset(getattr(args, "preset", "quick"), generation).with_values(
            **given,
            max_steps=None if max_steps is None else (max_steps or None),  # 0: no cap
            seed=getattr(args, "seed", None),
            r=getattr(args, "r", None),
            alpha=getattr(args, "alpha", None),
            dropout=getattr(args, "lora_dropout", None),
            target_modules=targets,
            quantize="nf4" if getattr(args, "load_in_4bit", False) else None,
        )
    except ValueError as err:
        field = str(err).removeprefix("LoRAConfig: ").split(" ")[0]
        raise ValueError(f"{_LORA_FLAGS[field]}: {err}" if field in _LORA_FLAGS else str(err)) from err


# flags named as TrainOptions' fields (--max-steps is translated: 0 means no cap)
_TRAIN_FLAGS = ("lr", "epochs", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "eval_batch_size",
                "max_length", "scoring", "prompt_format", "offdiag_test")  # fmt: skip


def _qlora(lora):
    """``_load``'s QLoRA argument for ``lora``: the config when it quantises, else None."""
    return lora if lora.quantize else None


def _model_name(args) -> str:
    """results.json's ``model``: the checkpoint's absolute path (a run is resumed or re-evaluated from
    anywhere), or the embedded model's name."""
    return os.path.abspath(args.model) if args.model else DEFAULT_MODEL


def _options(given: list[str] | None) -> dict[str, str]:
    """``--option NAME=VALUE`` flags as ``{NAME: VALUE}`` (text: the method's config converts it)."""
    out = {}
    for item in given or []:
        name, sep, value = item.partition("=")
        if not (sep and name.strip()):
            raise ValueError(f"--option {item}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


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
    md, png = compare_runs(args.runs, out, baseline=None if args.baseline == "none" else args.baseline)
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
    accs = evaluate_tasks(model, codec, tasks, opts, checkpoint=checkpoint, adapter=args.adapter)
    seen = [a for t, a in zip(tasks, accs) if trained is None or t.name in trained]
    for t, a in zip(tasks, accs):
        print(f"{t.name:>12s}  {100 * a:5.1f}%" + ("" if trained is None or t.name in trained else
                                                  "  (not trained yet)"))  # fmt: skip
    note = "" if len(seen) == len(accs) else f"  (over the {len(seen)} trained tasks of {len(accs)})"
    print(f"{'mean':>12s}  {100 * sum(seen) / len(seen):5.1f}%{note}")
    return 0


def cmd_demo(args) -> int:
    """``mbf demo``: ``mbf.cli.demo.run_demo`` (SLAO, seq-lora and multi-task, then the comparison)."""
    from mbf.cli.demo import run_demo

    return run_demo(args)


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

"""The ``mbf`` command's arguments: one parser, a subparser per command, shared argument groups."""

from __future__ import annotations

import argparse
import math

__all__ = ["DEFAULT_MODEL", "build_parser"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # results.json's "model" for the embedded default


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default; options whose default comes from --preset say so in their help
    (their argparse default is None, which would print as "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _preset_default(key: str) -> str:
    """``"default: quick X, paper Y"`` for an option that --preset sets (a TrainOptions or LoRAConfig
    field, read from the Preset objects)."""
    from mbf.experiment.presets import PRESETS

    def value(name: str):
        p = PRESETS[name]
        v = getattr(p.train, key) if hasattr(p.train, key) else getattr(p.lora, key)
        return ",".join(v) if isinstance(v, tuple) else (0 if v is None and key == "max_steps" else v)

    return f"default: {value('quick')} (--preset quick), {value('paper')} (--preset paper)"


def _checked(convert, ok, message: str):
    """An argparse ``type``: ``convert(s)``, rejected with ``"<s> <message>"`` unless ``ok``."""

    def parse(s: str):
        v = convert(s)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{s} {message}")
        return v

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "must be a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "must be >= 0")
# inf and nan parse as floats: refused here, so `--alpha inf` is an error about --alpha, not a NaN loss
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # mbf.experiment.models.DTYPES, plus auto
DTYPE_HELP = (
    "the base model's dtype; auto: on a CPU the fastest of float32, bfloat16 and float16 for the model's "
    "linears, measured at first use and cached (float32 unless a 16-bit dtype is >5%% faster); on a GPU "
    "bfloat16 where native. Adapters and optimizer state stay float32"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"local Hugging Face Llama checkpoint dir (default: embedded {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: the base's projection linears in NF4 (4-bit)"
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    from mbf.experiment.suites import ORDERS, SUITES
    from mbf.experiment.suites.real import SPLITS

    p.add_argument(
        "--suite",
        choices=SUITES,
        default="real",
        help="real: human-written text from installed data packages (--order std1..std3, long1..long3); "
        "domains: 5 generated tasks with distinct domains and answers (offline, fast); conflict "
        "(alias builtin): 5 generated tasks on identical inputs, a stress test; olora: the "
        "O-LoRA/SAPT benchmark folders under --data-dir",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="olora: root of the CL_Benchmark folders; real: a folder holding the data packages' folders "
        "instead of the installed packages (default: none)",
    )
    p.add_argument(
        "--order",
        default=None,
        help=f"task order (default: std1 for real, O1 for olora): real {', '.join(ORDERS['real'])}; olora "
        f"{', '.join(ORDERS['olora'])}; or comma-separated task names",
    )
    p.add_argument(
        "--suite-seed",
        type=int,
        default=None,
        help="seed of the generated suites and of the real suite's sampling (default: --seed, so that "
        "seeds replicate the experiment, data included; give it to pin the data across seeds)",
    )
    p.add_argument("--n-train", type=_positive_int, default=300, help="training examples per task (at most)")
    p.add_argument("--n-test", type=_positive_int, default=100, help="test examples per task (at most)")
    p.add_argument("--eval-split", choices=SPLITS, default=None, help="real: score on the test split "
                   "(default) or on held-out training examples (validation: choosing a learning rate "
                   "without the test set)")  # fmt: skip


def _add_eval_args(g) -> None:
    """How test answers are scored and prompts are written (continual and eval)."""
    from mbf.experiment.train import PROMPT_FORMATS, SCORERS

    g.add_argument("--eval-batch-size", type=_positive_int, default=None, help="test prompts scored at once "
                   "(default: 50)")  # fmt: skip
    g.add_argument(
        "--scoring",
        choices=SCORERS,
        default=None,
        help="generate: exact match of greedy decoding (the paper's; the headline); rank: the option of "
        "highest log-likelihood given the prompt (lm-eval-harness's multiple choice, faster); both: "
        "generate is the headline, rank recorded beside it (default: generate)",
    )
    g.add_argument(
        "--prompt-format",
        choices=("auto", *PROMPT_FORMATS),
        default="auto",
        help="chat: the prompt inside the model's chat template; plain: bare text; auto: chat when the "
        "model's tokenizer has a chat template (the embedded instruct model has)",
    )


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults from --preset; a flag given here wins)")
    g.add_argument(
        "--preset",
        choices=("quick", "paper"),
        default="quick",
        help="quick: 20 steps of batch 8 at lr 1e-3 per task (CPU-sized, this package's default); paper: the "
        "paper's r 8 on q/v, lr 1e-4, 1 epoch, batch 1 x 8 accumulation (all-generation suites: lr 5e-5, "
        "batch 2 x 4, 5 epochs)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of data order and adapter init")
    for flag, convert, field, text in _PRESET_FLAGS:
        g.add_argument(flag, type=convert, default=None, help=f"{text} ({_preset_default(field)})")
    _add_eval_args(g)
    g.add_argument(
        "--offdiag-test",
        type=_positive_int,
        default=None,
        help="evaluate the off-diagonal cells no metric reads (task j after stage i, j < i < T-1) on the "
        "first N test examples only (default: all); AA, BWT, FWT and LA keep every example",
    )


# the flags --preset sets: (flag, argparse type, the TrainOptions / LoRAConfig field, help)
_PRESET_FLAGS = (
    ("--lr", _positive_float, "lr", "AdamW learning rate"),
    (
        "--epochs",
        _positive_float,
        "epochs",
        "passes over each task's training set (paper on generation suites: 5)",
    ),
    ("--max-steps", _non_negative_int, "max_steps", "cap on optimizer steps per task, 0 for none"),
    ("--batch-size", _positive_int, "batch_size", "examples per forward/backward"),
    ("--grad-accum", _positive_int, "grad_accum", "micro-batches per optimizer step"),
    ("--warmup-steps", _non_negative_int, "warmup_steps", "linear warm-up steps, then a constant lr"),
    ("--weight-decay", _non_negative_float, "weight_decay", "AdamW weight decay"),
    ("--max-length", _positive_int, "max_length", "prompt tokens kept per example; only the input is cut"),
    ("--r", _positive_int, "r", "LoRA rank"),
    ("--alpha", _positive_float, "alpha", "LoRA alpha, scaling = alpha / r"),
    # the range [0, 1) is checked once, by LoRAConfig (its error names the flag)
    ("--lora-dropout", float, "dropout", "dropout on the LoRA branch's input in training, in [0, 1)"),
    ("--target-modules", str, "target_modules", "comma-separated linear names, or all-linear"),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand.

    Raises:
        MissingDependency: when the ``app`` extra is not installed.
    """
    from mbf.closed_form import SCHEDULES
    from mbf.experiment.methods import BASELINES, EXTENSIONS, METHODS, PAPER_ABLATIONS
    from mbf.strategies.slao import INITS

    parser = argparse.ArgumentParser(
        prog="mbf",
        description="Continual LoRA fine-tuning with one adapter (SLAO).",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_Formatter, **kw)

    c = add("continual", help="train a task sequence with one method; writes OUT/results.json")
    c.add_argument(
        "--method",
        choices=list(METHODS),
        default="slao",
        help=f"slao (the paper's method), seq-lora (the baseline), multi-task (the upper bound); the paper's "
        f"ablations {', '.join(PAPER_ABLATIONS)} and slao-random; this package's extensions, not the "
        f"paper's: {', '.join(EXTENSIONS)}; other methods SLAO is compared with: {', '.join(BASELINES)} "
        "(replay keeps 2%% of each task's training examples: not data-free)",
    )
    c.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="set a field of the method's config, e.g. --option lambda_orth=0.1 for o-lora (repeatable; "
        "default: the method's preset)",
    )
    c.add_argument("--out", required=True, help="run directory")
    run_control = {  # flag -> add_argument's keywords: resuming, then the method's overrides
        "--resume": dict(action="store_true", help="continue the run in --out from its last finished task, "
                         "with the settings it was started with (a changed one is refused, naming it)"),
        "--accept-changes": dict(action="store_true", help="with --resume: continue although settings "
                                 "differ from the saved run's, and record each difference in results.json "
                                 "(resumed_with_changes) and results.md"),
        "--schedule": dict(choices=SCHEDULES, default=None, help="override the method's λ schedule (default: "
                           "the method's; the paper's is sqrt = 1/√i; inverse, constant and none are this "
                           "package's extensions)"),
        "--init": dict(choices=INITS, default=None, help="override the method's task-init (default: the "
                       "method's)"),
        "--constant": dict(type=float, default=None, help="λ of --schedule constant (default: 0.5; an "
                           "extension)"),
        "--orthogonal-updates": dict(action="store_true", default=None, help="strict mode: a task's A "
                                     "updates stay out of the previous task's row space (default: off; "
                                     "this package's extension, not the paper's)"),
    }  # fmt: skip
    for flag, keywords in run_control.items():
        c.add_argument(flag, **keywords)
    _add_suite_args(c)
    _add_model_args(c)
    _add_train_args(c)

    cmp = add("compare", help="draw runs side by side (AA/BWT bars, per-task curves)")
    cmp.add_argument(
        "runs",
        nargs="+",
        help="run directories (or their results.json); runs of several orders of one suite "
        "are averaged over orders and seeds",
    )
    cmp.add_argument("--out", default=None, help="output dir (default: beside the first run, 'compare')")
    cmp.add_argument(
        "--baseline",
        default="seq-lora",
        help="the method every other is compared with: paired 95%% intervals of each difference (bootstrap "
        "over test examples and seeds, from the runs' saved predictions); 'none' for no differences",
    )
    cmp.add_argument(
        "--scorer",
        choices=("generate", "rank"),
        default=None,
        help="read every score as this scorer made it (runs made with --scoring both or this scorer); "
        "default: each run's headline (exact-match generation when both were recorded)",
    )

    e = add("eval", help="evaluate a run's merged adapter (or the bare model) on a suite")
    e.add_argument("--run", default=None, help="run directory: its checkpoint and its tasks")
    e.add_argument(
        "--adapter", choices=("merged", "finetuned"), default="merged", help="which adapter to use"
    )
    _add_suite_args(e)
    e.set_defaults(suite=None)  # with --run, the run's own suite; else real (a --suite given must agree)
    _add_model_args(e)
    _add_eval_args(e)
    e.add_argument(
        "--max-length", type=_positive_int, default=256, help="prompt tokens kept; only the input is cut"
    )

    d = add(
        "demo",
        help="InfLoRA, seq-lora and SLAO on two real tasks, dbpedia then amazon (the generated domains "
        "suite when its data packages are missing), then a comparison against seq-lora",
    )
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--seed", type=int, default=0, help="seed of data order and adapter init")
    d.add_argument("--n-test", type=_positive_int, default=80, help="test examples per task")
    d.add_argument("--max-steps", type=_positive_int, default=12, help="optimizer steps per task")
    d.add_argument(
        "--suite", choices=("auto", "real", "domains"), default="auto", help="auto: real if installed"
    )
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    d.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: two methods side by side, each in its own process with half the threads; 1: in turn",
    )
    _add_model_args(d)

    s = add(
        "sweep",
        help="run an experiment grid from its TOML config (reports/sweeps/*.toml; docs/sweeps.md)",
        description="Run every stage of a sweep config in order: its grid's `mbf continual` runs (resumable: "
        "a complete run is skipped, a cut one resumed with --resume, one log each in OUT/logs/), then its "
        "comparisons and steps. Paths in the config are relative to the current directory.",
    )
    s.add_argument("config", help="the sweep's TOML file, e.g. reports/sweeps/paired.toml")
    s.add_argument("--stage", default=None, help="run only this stage (default: every stage, in order)")
    dry = "print the command lines and run nothing (a complete run's line commented out, a cut one's resumed)"
    s.add_argument("--dry-run", action="store_true", help=dry)
    s.add_argument(
        "--jobs", type=_positive_int, default=None, help="runs at once (default: the config's jobs)"
    )
    s.add_argument(
        "--only",
        default=None,
        metavar="PATTERN",
        help="only the runs whose name matches this shell pattern, or one of these comma-separated ones "
        "(e.g. 'std1-*-s0' or 'slao-s?,seq-lora-s?'); the stages' comparisons and later steps are then "
        "left out",
    )

    b = add("bench", help="training-step and task-boundary benchmark that fits this machine")
    b.add_argument("--out", default=None, help="results JSON (default bench/results/<device>-<date>.json)")
    b.add_argument("--quick", action="store_true", help="the CPU set even on CUDA")
    b.add_argument("--no-boundary", action="store_true", help="skip the task-boundary benchmark")
    b.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the training step's base dtype; auto: on CPU float32 and each 16-bit dtype auto's probe timed "
        "(it picks among them), on CUDA what auto picks",
    )
    return parser

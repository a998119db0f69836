"""The ``mbf`` command's arguments: one parser, a subparser per command, shared argument groups."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_MODEL", "build_parser"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # results.json's "model" for the embedded default


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
_positive_float = _checked(float, lambda v: v > 0, "must be > 0")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # mbf.experiment.models.DTYPES, plus auto
DTYPE_HELP = (
    "the base model's dtype; auto: bfloat16 on a CPU with AMX-BF16 or AVX-512-BF16 (or a bf16 GPU), "
    "else float32. Adapters and optimizer state stay float32"
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
    """The parser of every subcommand.

    Raises:
        MissingDependency: when the ``app`` extra is not installed.
    """
    from mbf.config import INITS
    from mbf.experiment.methods import METHODS
    from mbf.reference import SCHEDULES

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
    c.add_argument("--constant", type=float, default=None, help="λ of --schedule constant (default 0.5)")
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
    d.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: the two methods side by side, each in its own process with half the threads; 1: in turn",
    )
    _add_model_args(d)

    b = sub.add_parser("bench", help="training-step and task-boundary benchmark that fits this machine")
    b.add_argument("--out", default=None, help="results JSON (default bench/results/<device>-<date>.json)")
    b.add_argument("--quick", action="store_true", help="the CPU set even on CUDA")
    b.add_argument("--no-boundary", action="store_true", help="skip the task-boundary benchmark")
    b.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the training step's base dtype; auto: float32 and, where auto picks it, bfloat16 as well",
    )
    return parser

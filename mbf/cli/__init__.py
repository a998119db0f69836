"""The ``mbf`` command: parses arguments and calls ``mbf.experiment`` / ``mbf.bench``.

mbf continual --suite real --method slao --out runs/slao          # one continual run (real text)
mbf continual --suite olora --data-dir CL_Benchmark --order O1 --method slao --out runs/o1
mbf compare runs/slao runs/seq --out runs/compare                  # methods side by side
mbf eval --run runs/slao                                           # re-evaluate a saved adapter
mbf demo                                                           # InfLoRA, seq-lora, SLAO on real text
mbf bench                                                          # training-step and task-boundary benchmark
mbf sweep reports/sweeps/paired.toml [--dry-run]                   # an experiment grid, resumable
"""

from __future__ import annotations

import errno
import os
import sys

from mbf._optional import EXPERIMENT, MissingDependency, require
from mbf.cli.commands import COMMANDS
from mbf.cli.parser import build_parser

__all__ = ["build_parser", "main"]

# errors a user can fix (a flag, a file, a directory, data that trains to NaN): printed in one line, no
# traceback. ValueError covers json.JSONDecodeError and UnicodeDecodeError, whose messages the loaders
# prefix with the file's name. MBF_DEBUG=1 shows the traceback instead.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,  # rundir.RunLocked too: names the pid holding the run directory
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    NotImplementedError,
    FloatingPointError,  # the loss became non-finite
    OverflowError,
    MissingDependency,
)


# OSErrors a user can fix: no space or quota left, a read-only file system, no permission
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _user_errors() -> tuple[type[BaseException], ...]:
    """``USER_ERRORS`` and safetensors' error (a damaged model or adapter file), imported lazily."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        return USER_ERRORS
    return (*USER_ERRORS, SafetensorError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``mbf`` command; returns the exit status (2 on a user error, printed in one line)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP threads that spin while they wait make a shared CPU crawl: a SmolLM2 training step
        # took 3-26 s instead of 0.9 s with other processes on 2 cores. libgomp reads the policy
        # once, when torch loads it, and `import mbf` has loaded torch by now: so the command
        # restarts itself once with the policy set (OMP_WAIT_POLICY=ACTIVE in the environment opts out).
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "mbf.cli", *sys.argv[1:]], env)
    try:
        require("mbf", EXPERIMENT)  # before the parser, which imports mbf.experiment
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except _user_errors() as e:
        if os.environ.get("MBF_DEBUG"):
            raise
        print(f"mbf: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only --out or model cache: the user's to fix, in one line
        if os.environ.get("MBF_DEBUG") or e.errno not in USER_ERRNOS:
            raise
        print(f"mbf: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The message on one line (a SafetensorError may span several), after the type's name where the
    message alone would not say what went wrong (Python's "cannot convert float infinity to integer")."""
    text = " ".join(str(e).split())
    if isinstance(e, OverflowError) or not text:
        return f"{type(e).__name__}: {text}".rstrip(": ")
    return text

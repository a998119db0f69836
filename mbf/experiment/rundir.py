"""A run directory's safety rules: one writer at a time, never a user's files, only our checkpoints.

- ``lock(out)``: an exclusive ``flock`` on ``out/.mbf-lock`` for as long as a command writes the run.
  The kernel drops it when the process dies (``kill -9`` included), so a crash never leaves a
  stale lock; a second process on the same directory fails at once, naming the holder's pid.
- ``check_out(out, resume)``: ``--out`` must be new, empty, or a run (it holds ``results.json``);
  a directory of other files is refused rather than written into.
- ``prune_checkpoints(out, keep)``: removes ``checkpoints/task-NN`` folders of this run other than
  ``keep``; nothing else under ``checkpoints/`` is ever deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RunLocked", "check_out", "lock", "prune_checkpoints"]

LOCK_NAME = ".mbf-lock"
RESULTS = "results.json"
_CHECKPOINT = re.compile(r"task-\d{2,}")  # what run.py names them: task-01, task-02, ...


class RunLocked(FileExistsError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def lock(out: str | Path) -> Iterator[Path]:
    """Hold ``out``'s lock while the block runs.

    Raises:
        RunLocked: another live process holds it (its pid is named).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(f"{out} is being written by another mbf process (pid {holder}); wait for it or "
                            "choose another --out") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # releases the flock; the file stays (harmless: the lock is the flock)


def check_out(out: str | Path, resume: bool) -> None:
    """Refuse an ``--out`` that holds files but no run, and a run without ``--resume``.

    Raises:
        FileExistsError: naming the directory and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if (out / RESULTS).exists():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return
    others = [p.name for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if others:
        shown = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"--out {out} is not empty and holds no mbf run ({shown}); choose a new directory"
        )


def prune_checkpoints(out: str | Path, keep: str) -> None:
    """Remove this run's ``checkpoints/task-NN`` folders except ``keep`` (e.g. ``"task-03"``)."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return
    for old in folder.iterdir():
        if old.is_dir() and _CHECKPOINT.fullmatch(old.name) and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)

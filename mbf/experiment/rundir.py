"""A run directory's safety rules: one writer at a time, never a user's files, only our checkpoints.

- ``lock(out)``: an exclusive ``flock`` on ``out/.mbf-lock`` for as long as a command writes the run.
  The kernel drops it when the process dies (``kill -9`` included), so a crash never leaves a
  stale lock; a second process on the same directory fails at once, naming the holder's pid. The lock
  file is never opened through a link (a symlink, even dangling, or a hard link is refused, named).
- ``check_out(out, resume)``: ``--out`` must be new, empty, or a run (it holds ``results.json``);
  a directory of other files is refused rather than written into; ``--resume`` needs it to exist. A
  checkpoint folder counts as a killed run's leftover only when it names that run (the run of the
  ``predictions/zero-shot.json`` beside it): a checkpoint copied in is not, and the directory is refused.
- ``prune_checkpoints(out, keep, run)``: removes ``checkpoints/task-NN`` folders other than ``keep`` that
  hold only checkpoint files of the run ``run``; nothing else under ``checkpoints/`` (a user's file in a
  ``task-NN`` folder, another run's checkpoint, a library save) is ever deleted.
- ``check_resume(out, settings)``: ``--resume`` continues a run only with the settings it was started
  with (training, data, method, LoRA, model); otherwise the remaining tasks would train and test on
  other data or settings than results.json records. The error lists every difference. The task order
  and the kind of method (continual or multi-task) are the run's identity: not even ``accept_changes``
  changes them. A results.json without its checksum (a /1 file from before checksums) is not resumed.
- ``check_checkpoint(out, results)``: the checkpoint a resume or ``mbf eval --run`` loads is the run's
  own (its ``run`` identity is results.json's) and was saved between tasks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from mbf import checkpoint as checkpoint_file
from mbf.config import LoRAConfig
from mbf.experiment import results as results_file
from mbf.experiment.methods import normalised_options
from mbf.experiment.train import TrainOptions

__all__ = [
    "RunLocked",
    "check_checkpoint",
    "check_out",
    "check_resume",
    "legacy_fingerprint",
    "lock",
    "prune_checkpoints",
    "resume_differences",
]

LOCK_NAME = ".mbf-lock"
RESULTS = "results.json"
_CHECKPOINT = re.compile(r"task-\d{2,}")  # what run.py names them: task-01, task-02, ...


_HELD: set[str] = set()  # run directories locked with for_callees=True by this process


class RunLocked(FileExistsError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def lock(out: str | Path, for_callees: bool = False) -> Iterator[Path]:
    """Hold ``out``'s lock while the block runs.

    ``for_callees``: a ``lock`` of the same directory inside the block is this one (the command holds
    the lock from before its model loads, and the run it calls takes it again); without it, any
    second ``lock`` is refused, in this process as in another.

    Raises:
        RunLocked: another live process holds it (its pid is named).
        FileExistsError: ``.mbf-lock`` is a symbolic or hard link, or not a regular file (named): the
            lock file is truncated and written, so it is never opened through a link.
    """
    out = Path(out)
    key = os.path.realpath(out)
    if key in _HELD:  # held for this process's callees (the command, then its run): already taken
        yield out
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(out / LOCK_NAME)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(f"{out} is being written by another mbf process (pid {holder}); wait for it or "
                            "choose another --out") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if for_callees:
            _HELD.add(key)
        try:
            yield out
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the flock; the file stays (harmless: the lock is the flock)


def _open_lock_file(path: Path) -> int:
    """``path`` opened read-write (created 0644 when absent), never through a link: a symbolic link (even
    a dangling one) or a file with another name would let the pid written into the lock overwrite, or
    create, a file that is not the run's.

    Raises:
        FileExistsError: ``path`` is a symbolic link, a hard link or not a regular file (one line, named).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FileExistsError(
                f"{path} is a symbolic link: mbf writes its lock file and never follows a link there; "
                "remove it"
            ) from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink != 1:
        problem = f"is a hard link (one of the {info.st_nlink} names of a file)"
    if problem:
        os.close(fd)
        raise FileExistsError(
            f"{path} {problem}: mbf writes its lock file and never writes through it; remove it"
        )
    return fd


# the temporary files of mbf.io.atomic_write (".results.json.k3j2x.json"), left behind by a kill -9
_TEMPORARY = re.compile(r"\.(results\.json|results\.md|accuracy\.png)\..+")


# what ContinualLoRA.save writes into a checkpoint folder, and the temporaries a kill -9 may leave there
_SAVED = r"(continual\.json|adapters-[0-9a-f]+\.safetensors)"
_CHECKPOINT_FILE = re.compile(rf"{_SAVED}|\.{_SAVED}\..+")


def _is_checkpoint(folder: Path) -> bool:
    """A ``task-NN`` folder holding only what ``ContinualLoRA.save`` writes: this run's (or an earlier
    run's) checkpoint, never a user's folder, whatever its name."""
    return (
        folder.is_dir()
        and _CHECKPOINT.fullmatch(folder.name) is not None
        and all(f.is_file() and _CHECKPOINT_FILE.fullmatch(f.name) for f in folder.iterdir())
    )


# what predictions.write names them (zero-shot.json, stage-NN.json) and its temporaries
_PREDICTION = re.compile(r"\.?(zero-shot|stage-\d{2,})\.json(\..+)?")


_UNREADABLE = object()


def _saved_run(meta: Path):
    """The ``run`` a checkpoint's ``continual.json`` or a predictions file names (None: none; ``_UNREADABLE``:
    not a JSON object)."""
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _UNREADABLE
    return data.get("run") if isinstance(data, dict) else _UNREADABLE


def _saved_run_id(meta: Path) -> str | None:
    run = _saved_run(meta)
    return run.get("run_id") if isinstance(run, dict) and isinstance(run.get("run_id"), str) else None


def _left_by_a_killed_run(folder: Path) -> bool:
    """A checkpoint folder that a run killed before its first commit left: a save cut before its
    ``continual.json``, or one naming the run whose ``predictions/zero-shot.json`` (written before its first
    task) lies beside it. A checkpoint copied in from elsewhere (another run's, a library save) is not."""
    meta = folder / checkpoint_file.META
    if not meta.exists():
        return True
    saved, zero_shot = _saved_run_id(meta), folder.parent.parent / "predictions" / "zero-shot.json"
    return saved is not None and saved == _saved_run_id(zero_shot)


def _ours(p: Path) -> bool:
    """What a run killed before its first commit (results.json) can leave: the lock file, a temporary
    file, a ``checkpoints/`` of that run's checkpoint folders only, a ``predictions/`` of prediction files
    only (the zero-shot's, written before the first task's commit). Such a directory is started again,
    not refused."""
    if p.name == LOCK_NAME or _TEMPORARY.fullmatch(p.name):
        return True
    if p.name == "predictions" and p.is_dir():
        return all(f.is_file() and _PREDICTION.fullmatch(f.name) for f in p.iterdir())
    return (
        p.name == "checkpoints"
        and p.is_dir()
        and all(_is_checkpoint(c) and _left_by_a_killed_run(c) for c in p.iterdir())
    )


def check_out(out: str | Path, resume: bool) -> None:
    """Refuse an ``--out`` that holds files but no run, and a run without ``--resume``.

    A directory holding only what a run killed before its first commit leaves (see ``_ours``) is no
    one else's: it is accepted, and the run starts from the beginning.

    Raises:
        FileExistsError: naming the directory and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if resume and not out.exists():
        raise FileNotFoundError(f"--resume: {out} does not exist: no run to resume (drop --resume to start)")
    if (out / RESULTS).exists():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return
    others = [p.name for p in out.iterdir() if not _ours(p)] if out.is_dir() else []
    if others:
        shown = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"--out {out} is not empty and holds no mbf run ({shown}); choose a new directory"
        )


def prune_checkpoints(out: str | Path, keep: str, run: dict | None = None) -> None:
    """Remove this run's ``checkpoints/task-NN`` folders except ``keep`` (e.g. ``"task-03"``): saves cut
    before their ``continual.json``, and those whose ``continual.json`` names the run ``run``
    (``results.identity``; a run of results schema /1, without ``run_id``: those naming no run too, its own
    older saves). A checkpoint of another run or of no run (copied in by a user) is never deleted."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return
    for old in folder.iterdir():
        if old.name == keep or not _is_checkpoint(old):
            continue
        meta = old / checkpoint_file.META
        saved = _saved_run(meta) if meta.exists() else None
        ours = run is not None and (saved == run or (saved is None and "run_id" not in run))
        if not meta.exists() or ours:
            shutil.rmtree(old, ignore_errors=True)


# What a resumed run must share with the saved one. A key absent from the saved file (a run written
# before it was recorded) is not compared; "model" (the path) only when the saved run lacks the weights'
# fingerprint, so a checkpoint folder that moved still resumes, another one of the same shape does not.
RESUME_KEYS = ("method", "options", "seed", "tasks", "lora", "train", "dtype", "suite", "suite_seed",
               "n_train", "n_test", "order", "data_dir", "task_metrics", "data_fingerprint",
               "model_fingerprint")  # fmt: skip
# how many prompts are decoded at once: a memory knob, not the experiment
RESUME_FREE = frozenset({"train.eval_batch_size"})
# what no --accept-changes changes: results.json's columns are these tasks in this order
IDENTITY_KEYS = frozenset({"tasks", "order", "suite"})


def _normalised(key: str, value, method: str | None = None):
    """Older files lack fields added since: they compare as the defaults (``options``: of ``method``'s
    config)."""
    if value is None:
        return None
    if key == "model":  # older runs kept the path as given: relative to where the run started
        return os.path.abspath(value)
    if key == "options":
        return normalised_options(method, value)
    if key == "lora":
        return LoRAConfig.from_dict(value).to_dict()
    if key == "train":
        return {**asdict(TrainOptions()), **value}
    return value


def _show(key: str, value) -> str:
    if key.endswith("fingerprint") and isinstance(value, str):
        return value.rpartition(":")[2][:12]  # "sha256:<hex>" or an older file's bare hex
    return repr(value)


def resume_differences(saved: dict, settings: dict) -> list[str]:
    """``"name: saved -> given"`` for each setting in ``settings`` that differs from ``saved``'s.

    Args:
        saved: the run's results.json.
        settings: the new invocation's settings (results.json's fields; those absent are not compared).
    """
    diffs = []
    keys = [k for k in RESUME_KEYS if k in settings and (k in saved or k == "dtype")]
    if "model" in settings and "model" in saved and "model_fingerprint" not in saved:
        keys.append("model")  # a run older than the fingerprint: its path is all there is
    for key in keys:
        was = results_file.base_dtype(saved) if key == "dtype" else saved.get(key)
        method = settings.get("method", saved.get("method"))
        was, now = _normalised(key, was, saved.get("method")), _normalised(key, settings[key], method)
        if isinstance(was, dict) and isinstance(now, dict):
            for field in sorted(set(was) | set(now)):
                name = f"{key}.{field}"
                if name not in RESUME_FREE and was.get(field) != now.get(field):
                    diffs.append(f"{name}: {was.get(field)!r} -> {now.get(field)!r}")
        elif was != now:
            diffs.append(f"{key}: {_show(key, was)} -> {_show(key, now)}")
    return diffs


def legacy_fingerprint(out: str | Path) -> bool:
    """True when the run in ``out`` recorded its model with the older fingerprint (of each tensor's first
    and last 64 values): a resume compares it with the same one."""
    try:
        saved = results_file.read(out).get("model_fingerprint")
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(saved, str) and ":" not in saved


def check_resume(out: str | Path, settings: dict, accept_changes: bool = False) -> dict | None:
    """The saved results of the run in ``out`` if ``settings`` agree with them (None: no run yet).

    With ``accept_changes`` a difference is not an error: the results get a ``resumed_with_changes``
    entry ``{"after_task": k, "changes": [...]}`` (the recorded settings stay those of the first tasks),
    and ``results.md`` says so.

    Raises:
        ValueError: listing every differing setting as ``name: saved -> given``; and, even with
            ``accept_changes``, on another ``eval_split`` (absent: ``"test"``) than the saved run's.
    """
    path = Path(out) / RESULTS
    if not path.exists():
        return None
    saved = results_file.read(path)
    if "sha256" not in saved:  # a /1 file from before checksums: its content cannot be checked
        raise ValueError(
            f"{path}: sha256 is missing: a results file written before checksums (schema "
            f"{saved['schema']!r}) cannot be checked, so it is not continued: run it again in a new --out "
            "(mbf compare and mbf eval --run still read it)"
        )
    diffs = resume_differences(saved, settings)
    # the run's identity: its columns are these tasks in this order, its stages one method's kind (continual
    # or the multi-task bound); no --accept-changes continues it as another run
    fixed = [d for d in diffs if d.split(":")[0].split(".")[0] in IDENTITY_KEYS]
    if "options" in settings and (saved.get("options") is None) != (settings["options"] is None):
        fixed.insert(0, f"method: {saved.get('method')!r} -> {settings.get('method')!r}")
    if fixed:
        raise ValueError(
            f"{path}: {'; '.join(fixed)}: the task order and the kind of method (continual or multi-task) "
            "are the run's identity, not a setting: --resume continues the run only with its own, even with "
            "--accept-changes; choose another --out for this one"
        )
    split, given = results_file.eval_split(saved), results_file.eval_split(settings)
    if split != given:  # not even with --accept-changes: one run's scores would mix two splits
        raise ValueError(
            f"--resume: {out} is scored on the {split} split (eval_split: {split!r} -> {given!r}); its "
            f"remaining tasks cannot be scored on the {given} split: "
            + ("pass --eval-split validation" if split == "validation" else "drop --eval-split")
            + " or choose another --out"
        )
    if diffs and not accept_changes:
        raise ValueError(
            f"--resume: {out} was run with other settings; the remaining tasks would train or test on "
            f"other data or settings than results.json records ({'; '.join(diffs)}). Give the run's own "
            "settings, choose another --out, or pass --accept-changes to continue and record the changes"
        )
    if diffs:
        entry = {"after_task": len(saved.get("per_task", [])), "changes": diffs}
        saved.setdefault("resumed_with_changes", []).append(entry)
    return saved


def check_checkpoint(out: str | Path, results: dict) -> Path:
    """The checkpoint folder results.json names, once its ``continual.json`` shows it is this run's, saved
    between two tasks (its tensors and fields are checked when the strategy loads it).

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: a checkpoint saved inside a task, or one whose ``run`` is not this run's identity
            (another run's, copied in; a library save), naming the field. A run of results schema /1 (its
            older checkpoints bound no identity) accepts one without ``run``.
    """
    path = Path(out) / results["checkpoint"]
    meta, meta_path = checkpoint_file.read_meta(path)
    if meta.get("in_task") is True:
        raise ValueError(
            f"{meta_path}: in_task=true: saved inside a task, but a run saves its checkpoints between tasks: "
            "it is not this run's checkpoint and cannot continue it"
        )
    run, want = meta.get("run"), results_file.identity(results)
    if run is None and results["schema"] != results_file.SCHEMA:  # older runs bound no identity in
        return path
    if not isinstance(run, dict):
        raise ValueError(f"{meta_path}: run={run!r}: not saved by this run (results.json's run_id "
                         f"{want.get('run_id')}): a checkpoint copied in cannot continue it")  # fmt: skip
    diffs = [f"run.{k}={_show(k, run.get(k))} (results.json: {_show(k, v)})" for k, v in want.items()
             if run.get(k) != v]  # fmt: skip
    if diffs:
        raise ValueError(f"{meta_path}: {'; '.join(diffs)}: saved by another run; a checkpoint copied in "
                         "cannot continue this one")  # fmt: skip
    return path

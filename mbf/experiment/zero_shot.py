"""The bare model's score on each task: the zero-shot reference of forward transfer (FWT).

Every run of a sweep shares it (same model, same test sets), so it is kept in a small JSON cache keyed
by a fingerprint of the model's weights and of the test prompts, answers, metric and prompt length:
one evaluation per suite instead of one per run, and never a stale score for another model or set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mbf.experiment.batches import Codec, encode_example
from mbf.experiment.evaluate import headline, score_task, scorers_of
from mbf.experiment.results import checksum as _checksum  # the one canonical form
from mbf.experiment.tasks import Task
from mbf.experiment.train import TrainOptions
from mbf.io import atomic_write_json, read_json_object

__all__ = ["fingerprint", "weights_fingerprint", "zero_shot_records"]


@torch.no_grad()
def _hash_weights(h, model: nn.Module, legacy: bool = False) -> None:
    """Every parameter's name, shape, dtype and bytes (``legacy``: its first and last 64 values only,
    the fingerprint of runs recorded before: a model that differs elsewhere passed for the same)."""
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if legacy:
            h.update(torch.cat([flat[:64], flat[-64:]]).float().numpy().tobytes())
        else:
            h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def weights_fingerprint(model: nn.Module, legacy: bool = False) -> str:
    """``"sha256:<hex>"`` over every parameter's name, shape, dtype and values: which model a run trained
    (results.json ``model_fingerprint``), whatever path it was loaded from. ``legacy``: the bare hex of
    the older fingerprint, to compare with a run that recorded one."""
    h = hashlib.sha256()
    _hash_weights(h, model, legacy)
    return h.hexdigest() if legacy else f"sha256:{h.hexdigest()}"


@torch.no_grad()
def fingerprint(
    model: nn.Module, codec: Codec, tasks: list[Task], max_length: int, scoring: str = "generate"
) -> str:
    """SHA-256 over every parameter (as ``weights_fingerprint``), over the encoded test prompts and
    answers, and over the scorers: two checkpoints or two test sets never share an entry."""
    h = hashlib.sha256()
    _hash_weights(h, model)
    h.update(f"scoring={scoring}".encode())
    for t in tasks:
        h.update(f"{t.name}|{t.metric}|{max_length}".encode())
        for ex in t.test:
            prompt, answer = encode_example(codec, t, ex, max_length)
            h.update(json.dumps([prompt, answer]).encode())
    return h.hexdigest()


def zero_shot_records(
    model: nn.Module,
    codec: Codec,
    tasks: list[Task],
    opts: TrainOptions,
    *,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """The model's per-example records on each task as it is (call before injecting LoRA), for every
    scorer of ``opts.scoring``, from ``cache`` when there.

    Returns:
        ``score_task``'s records, one per (task, scorer), each with ``"adapter": "none"``.
    """
    path = None
    if cache is not None:
        key = fingerprint(model, codec, tasks, opts.max_length, scoring=opts.scoring)
        path = Path(cache) / f"{key[:32]}.json"
        if path.is_file():
            saved = _read_cache(path, tasks, opts)
            if saved is not None:
                return saved
    records = []
    for t in tasks:
        for rec in score_task(model, codec, t, opts, desc=f"zero-shot {t.name}").values():
            records.append({**rec, "adapter": "none"})
    scores = [f"{r['task']} {r['score']:.2f}" for r in records if r["scorer"] == headline(opts.scoring)]
    log(f"zero-shot (bare model): {' '.join(scores)}")
    if path is not None:
        entry = {"tasks": [t.name for t in tasks], "records": records}
        atomic_write_json({**entry, "sha256": _checksum(entry)}, path, indent=None)
    return records


def _read_cache(path: Path, tasks: list[Task], opts: TrainOptions) -> list[dict] | None:
    """A cache entry's records, checked against what wrote it (None: an entry older than its checksum,
    or than its records, which is evaluated again and rewritten).

    Raises:
        ValueError: a file that is not JSON, fails its checksum, or holds records of other tasks or scorers,
            or a score out of range, naming the file and the field (delete it to evaluate again).
    """
    again = "; delete it to evaluate the bare model again"
    saved = read_json_object(path, "zero-shot cache entry: ", again)
    if "records" not in saved or "sha256" not in saved:  # older entries: never trusted unchecked
        return None
    if saved["sha256"] != _checksum(saved):
        raise ValueError(f"{path}: its SHA-256 differs from its content: the zero-shot cache entry was "
                         f"edited or damaged{again}")  # fmt: skip
    records, want = saved["records"], {(t.name, s) for t in tasks for s in scorers_of(opts.scoring)}
    held = {(r.get("task"), r.get("scorer")) for r in records if isinstance(r, dict)} if isinstance(
        records, list) else None  # fmt: skip
    if held != want or len(records) != len(want):
        raise ValueError(f"{path}: records are not one per task and scorer of this run{again}")
    for k, r in enumerate(records):
        correct, score = r.get("correct"), r.get("score")
        ok = (
            isinstance(correct, list)
            and correct
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in correct)
        )
        if not ok or not isinstance(score, (int, float)) or abs(score - sum(correct) / len(correct)) > 1e-9:
            raise ValueError(f"{path}: records[{k}].score={score!r} is not the mean of its correct scores in "
                             f"[0, 1]{again}")  # fmt: skip
    return records

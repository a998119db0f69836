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
from mbf.experiment.evaluate import headline, score_task
from mbf.experiment.tasks import Task
from mbf.experiment.train import TrainOptions
from mbf.io import atomic_write_json

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
            saved = json.loads(path.read_text())
            if "records" in saved:  # older cache files kept the scores alone: evaluated again
                return saved["records"]
    records = []
    for t in tasks:
        for rec in score_task(model, codec, t, opts, desc=f"zero-shot {t.name}").values():
            records.append({**rec, "adapter": "none"})
    scores = [f"{r['task']} {r['score']:.2f}" for r in records if r["scorer"] == headline(opts.scoring)]
    log(f"zero-shot (bare model): {' '.join(scores)}")
    if path is not None:
        atomic_write_json({"tasks": [t.name for t in tasks], "records": records}, path, indent=None)
    return records

"""Per-example predictions of every evaluation of a run, beside its results.json.

One JSON file per evaluation point, written atomically before results.json (the commit point), so a
committed stage always has its predictions, and a stage cut by a crash is written again when the run
resumes::

    OUT/predictions/zero-shot.json    the bare model, every task (FWT's reference)
    OUT/predictions/stage-NN.json     after stage NN (1-based): every task evaluated then

Schema ``"mbf-predictions/1"``: ``{"schema", "stage" (0 for zero-shot), "after" (the task trained, or
"zero-shot" / "all"), "evals": [record, ...]}``, a record per (task, scorer, adapter)::

    task, scorer ("generate" | "rank"), adapter ("merged" | "finetuned" | "none": the bare model)
    ids       [int]: the examples' indices in the task's test set (the run's data_fingerprint fixes it)
    pred      [str]: what the model answered (generate: the decoded text; rank: the chosen option)
    gold      [str]: the reference answer
    correct   [float]: 1/0 exact match (or Rouge-L F1 for a generation task)
    option_scores  [[float | null]]: rank only, each option's summed log-likelihood, in the task's label
              order; null: left unfinished, its first tokens already below a finished option's score
    score     float: the mean of correct
"""

from __future__ import annotations

import json
from pathlib import Path

from mbf.io import atomic_write_json

__all__ = ["FOLDER", "SCHEMA", "load_run", "read", "write"]

SCHEMA = "mbf-predictions/1"
FOLDER = "predictions"


def _name(stage: int) -> str:
    return "zero-shot.json" if stage == 0 else f"stage-{stage:02d}.json"


def write(run_dir: str | Path, stage: int, after: str, evals: list[dict]) -> Path:
    """Write the predictions of evaluation point ``stage`` (0: zero-shot) atomically; compact JSON."""
    data = {"schema": SCHEMA, "stage": stage, "after": after, "evals": evals}
    return atomic_write_json(data, Path(run_dir) / FOLDER / _name(stage), indent=None)


def read(run_dir: str | Path, stage: int) -> dict | None:
    """The predictions of ``stage`` (0: zero-shot), or None when the run has none (an older run).

    Raises:
        ValueError: on a file that is not JSON of this schema (naming it).
    """
    path = Path(run_dir) / FOLDER / _name(stage)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: schema {data.get('schema') if isinstance(data, dict) else None!r} is not {SCHEMA!r}"
        )
    return data


def load_run(run_dir: str | Path, results: dict, scorer: str) -> dict | None:
    """The correctness vectors a paired comparison needs, for ``scorer``, from a complete run's files:
    ``{task: {"final", "diag", "next", "zero"}}`` (lists of per-example scores; ``diag``, ``next`` and
    ``zero`` only where the run has them: multi-task has one stage), with the merged adapter.
    None when a stage's predictions are missing (a run older than the files)."""
    tasks, T = results["tasks"], len(results["stages"])
    stages = {}
    for s in range(0 if results.get("zero_shot") is not None else 1, T + 1):
        data = read(run_dir, s)
        if data is None:
            if s == 0:
                continue
            return None
        stages[s] = {e["task"]: e["correct"] for e in data["evals"]
                     if e["scorer"] == scorer and e["adapter"] in ("merged", "none")}  # fmt: skip
    out: dict[str, dict] = {t: {} for t in tasks}
    for j, t in enumerate(tasks):
        if t in stages[T]:
            out[t]["final"] = stages[T][t]
        if T == len(tasks):  # a continual run: the diagonal, and the task before it was trained
            out[t]["diag"] = stages[j + 1].get(t)
            if j >= 1:
                out[t]["next"] = stages[j].get(t)
            if 0 in stages:
                out[t]["zero"] = stages[0].get(t)
        out[t] = {k: v for k, v in out[t].items() if v is not None}
    return out

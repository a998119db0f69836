"""``results.json``: what a continual run measured, rewritten after every task (the commit point).

Schema ``"mbf-continual-results/2"`` (``/1``: files written before ``run_id`` and the required
``sha256``; read, never resumed). Every field, what it means and which older files lack it: the schema in
docs/results.md ("``results.json``: what a run writes"), the one place it is written; a field added here
is added there.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from pathlib import Path

from mbf.experiment.metrics import accuracy_metrics
from mbf.io import atomic_write_json, read_json_object, versions

__all__ = [
    "DEFAULTED",
    "IDENTITY",
    "LEGACY_SCHEMA",
    "SCHEMA",
    "add_stage",
    "base_dtype",
    "checksum",
    "eval_split",
    "finish",
    "headline",
    "identity",
    "new",
    "read",
    "scoring",
    "scorers_of",
    "write",
]

SCHEMA = "mbf-continual-results/2"
LEGACY_SCHEMA = "mbf-continual-results/1"  # before run_id; sha256 optional (older files have none)
# what makes a run this run: bound into its checkpoints and predictions files, compared on every read
IDENTITY = ("run_id", "method", "seed", "suite", "order", "tasks", "model_fingerprint", "data_fingerprint")
LEGACY_DTYPE = "float32"  # every run before "dtype" was recorded loaded its model in float32


def base_dtype(results: dict) -> str:
    """The base model's dtype a run used (``"float32"`` for files older than the field)."""
    return results.get("dtype") or LEGACY_DTYPE


def eval_split(results: dict) -> str:
    """The split a run (or a run's settings) is scored on: ``"test"`` where the field is absent (every
    test-split run: only ``--eval-split validation`` records it)."""
    return results.get("eval_split") or "test"


# top-level fields whose absence means a default (older files; test-split runs), each with its reader
DEFAULTED = {"dtype": base_dtype, "eval_split": eval_split}


def scorers_of(scoring: str) -> tuple[str, ...]:
    """The scorers ``TrainOptions.scoring`` runs, the headline first."""
    return ("generate", "rank") if scoring == "both" else (scoring,)


def headline(scoring: str) -> str:
    """The scorer whose scores are results.json's ``accuracy``: generation unless only ranking runs."""
    return scorers_of(scoring)[0]


def scoring(results: dict) -> str:
    """The ``--scoring`` a run was made with: ``"generate"`` where the field is absent (older runs)."""
    return (results.get("train") or {}).get("scoring", "generate")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new(config: dict) -> dict:
    """Results of a run that has trained nothing yet.

    Args:
        config: the run's settings: ``method``, ``options``, ``seed``, ``tasks``, ``lora``, ``train``
            and where the tasks and model came from.
    """
    return {
        "schema": SCHEMA,
        "run_id": uuid.uuid4().hex,
        **config,
        "stages": [],
        "accuracy": [],
        "per_task": [],
        "metrics": {"AA": None, "BWT": None, "FWT": None, "wall_s": 0.0},
        "complete": False,
        "checkpoint": None,
        "versions": versions(),
        "started": _now(),
        "updated": _now(),
    }


def add_stage(
    results: dict,
    *,
    task: str,
    accuracy: list[float],
    stats: dict,
    train_s: float,
    eval_s: float,
    adapter_bytes: int,
    peak_rss_mb: float,
    checkpoint: str | None,
    by_scorer: dict[str, list[float]] | None = None,
    finetuned: float | None = None,
    optimizer_bytes: int | None = None,
    buffer_bytes: int | None = None,
) -> None:
    """Record one finished stage in place.

    Args:
        results: as ``new`` made it.
        task: the task trained (``"all"`` for multi-task).
        accuracy: accuracy on every task seen so far (multi-task: on all tasks).
        stats: ``train_steps``' ``{"steps", "first_loss", "final_loss"}``.
        train_s: seconds of training.
        eval_s: seconds of evaluation.
        adapter_bytes: bytes of adapter state held after the stage.
        peak_rss_mb: the process's peak resident memory so far.
        checkpoint: the adapter state's directory relative to the run dir (None: not saved).
        by_scorer: every scorer's row (the headline's is ``accuracy``), when the run records them.
        finetuned: the score on the task just trained with the fine-tuned adapter (continual methods).
        optimizer_bytes: bytes of optimizer state the stage's training held (None: not recorded).
        buffer_bytes: bytes of replayed data held after the stage (None: the method keeps none).
    """
    results["stages"].append(task)
    results["accuracy"].append([round(a, 4) for a in accuracy])
    for scorer, row in (by_scorer or {}).items():
        results.setdefault("accuracy_by_scorer", {}).setdefault(scorer, []).append([round(a, 4) for a in row])
    if finetuned is not None:
        results.setdefault("finetuned_diagonal", []).append(round(finetuned, 4))
    results["per_task"].append(
        {
            "task": task,
            **stats,
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "adapter_bytes": adapter_bytes,
            **({} if optimizer_bytes is None else {"optimizer_bytes": optimizer_bytes}),
            **({} if buffer_bytes is None else {"buffer_bytes": buffer_bytes}),
            "peak_rss_mb": round(peak_rss_mb, 1),
        }
    )
    results["metrics"]["wall_s"] = round(sum(p["train_s"] + p["eval_s"] for p in results["per_task"]), 2)
    results["checkpoint"] = checkpoint
    results["updated"] = _now()


def _metrics(matrix: list[list[float]], zero_shot: list[float] | None, multi_task: bool) -> dict:
    if multi_task:
        row = matrix[-1]
        return {"AA": round(sum(row) / len(row), 4), "BWT": None, "FWT": None, "LA": None}
    m = accuracy_metrics(matrix, zero_shot)
    m["LA"] = sum(matrix[j][j] for j in range(len(matrix))) / len(matrix)
    return {k: None if v is None else round(v, 4) for k, v in m.items()}


def finish(results: dict, multi_task: bool = False) -> None:
    """Mark the run complete and fill AA, BWT, FWT and LA (multi-task: AA of its one row, no others),
    the fine-tuned adapter's LA where recorded, and every scorer's metrics where several ran."""
    results["metrics"].update(_metrics(results["accuracy"], results.get("zero_shot"), multi_task))
    if results.get("finetuned_diagonal"):
        diag = results["finetuned_diagonal"]
        results["metrics"]["LA_finetuned"] = round(sum(diag) / len(diag), 4)
    zero = results.get("zero_shot_by_scorer") or {}
    by = {s: _metrics(m, zero.get(s), multi_task) for s, m in results.get("accuracy_by_scorer", {}).items()}
    if by:
        results["metrics"]["by_scorer"] = by
    results["complete"] = True


def read(path: str | Path) -> dict:
    """Load a results.json (a run directory or the file).

    Raises:
        FileNotFoundError: when there is no such file.
        ValueError: when the file is not UTF-8 JSON (naming it) or not an mbf results file of a known
            schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = read_json_object(path)
    schema = data.get("schema")
    if schema not in (SCHEMA, LEGACY_SCHEMA):
        raise ValueError(f"{path}: schema {schema!r} is not {SCHEMA!r} (nor the older {LEGACY_SCHEMA!r})")
    _check(path, data)
    return data


def identity(results: dict) -> dict:
    """The run's identity (``IDENTITY``'s fields that ``results`` records): what its checkpoints and
    predictions files carry as ``run``."""
    return {k: results[k] for k in IDENTITY if k in results}


def checksum(results: dict) -> str:
    """SHA-256 of every field but ``sha256`` itself, in a canonical JSON form (``write`` stores it)."""
    body = {k: v for k, v in results.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scores(path: Path, name: str, values, low: float = 0.0, high: float = 1.0) -> None:
    """Refuse ``values`` (a list of scores) unless each is a number in [low, high] (None: not measured)."""
    if not isinstance(values, list):
        raise ValueError(f"{path}: {name}={values!r} must be a list of scores")
    for j, v in enumerate(values):
        if not (_is_number(v) and low <= v <= high):
            raise ValueError(f"{path}: {name}[{j}]={v!r} is not a score in [{low:g}, {high:g}]")


# top-level fields every results file has (each schema), and what they hold
_REQUIRED = {"method": str, "seed": int, "tasks": list, "stages": list, "accuracy": list, "per_task": list,
             "metrics": dict, "complete": bool}  # fmt: skip


def _check_fields(path: Path, data: dict) -> None:
    """Every score in [0, 1] (BWT and FWT, differences of scores, in [-1, 1]), every matrix the shape its
    stages give, the stages those of the task order: what compare, report and --resume compute from."""
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise ValueError(f"{path}: {key} is missing: not a complete results file")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ValueError(f"{path}: {key}={data[key]!r} must be a {kind.__name__}")
    tasks, stages = data["tasks"], data["stages"]
    if not tasks or not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"{path}: tasks={tasks!r} must be distinct task names")
    T, multi_task = len(tasks), data["method"] == "multi-task"  # its one stage: "all", a row of every task
    want = ["all"][: len(stages)] if multi_task else tasks[: len(stages)]
    if stages != want:
        raise ValueError(f"{path}: stages={stages!r} are not the order's tasks {want!r}")
    if data["complete"] and len(stages) != (1 if multi_task else T):
        raise ValueError(f"{path}: complete=true with {len(stages)} of {T} stages")
    matrices = {"accuracy": data["accuracy"]}
    for scorer, matrix in (data.get("accuracy_by_scorer") or {}).items():
        matrices[f"accuracy_by_scorer.{scorer}"] = matrix
    for name, matrix in matrices.items():
        if not isinstance(matrix, list) or len(matrix) != len(stages):
            raise ValueError(f"{path}: {name} has {len(matrix) if isinstance(matrix, list) else matrix!r} "
                             f"rows for {len(stages)} stages")  # fmt: skip
        for i, row in enumerate(matrix):
            _scores(path, f"{name}[{i}]", row)
            lengths = (T,) if multi_task else range(i + 1, min(i + 2, T) + 1)
            if len(row) not in lengths:
                raise ValueError(f"{path}: {name}[{i}] has {len(row)} scores after stage {i + 1} of {T}")
    zero = {"zero_shot": data.get("zero_shot")}
    for scorer, row in (data.get("zero_shot_by_scorer") or {}).items():
        zero[f"zero_shot_by_scorer.{scorer}"] = row
    for name, row in zero.items():
        if row is not None:
            _scores(path, name, row)
            if len(row) != T:
                raise ValueError(f"{path}: {name} has {len(row)} scores for {T} tasks")
    if data.get("finetuned_diagonal") is not None:
        _scores(path, "finetuned_diagonal", data["finetuned_diagonal"])
        if len(data["finetuned_diagonal"]) > len(stages):
            raise ValueError(f"{path}: finetuned_diagonal has more scores than the {len(stages)} stages")
    metrics = {"": data["metrics"], **{f"by_scorer.{s}.": m for s, m in
                                        (data["metrics"].get("by_scorer") or {}).items()}}  # fmt: skip
    for prefix, m in metrics.items():
        for key, value in m.items() if isinstance(m, dict) else ():
            low = -1.0 if key in ("BWT", "FWT") else 0.0
            high = math.inf if key == "wall_s" else 1.0
            if key == "by_scorer" or value is None or (_is_number(value) and low <= value <= high):
                continue
            raise ValueError(f"{path}: metrics.{prefix}{key}={value!r} is out of range [{low:g}, {high:g}]")
    for i, stage in enumerate(data["per_task"]):
        if not isinstance(stage, dict):
            raise ValueError(f"{path}: per_task[{i}]={stage!r} must be an object")
        for key, value in stage.items():
            if key == "task" or value is None or (_is_number(value) and (value >= 0 or "loss" in key)):
                continue
            raise ValueError(f"{path}: per_task[{i}].{key}={value!r} must be a number >= 0")


def _check(path: Path, data: dict) -> None:
    """Refuse a results file that was edited (its checksum), lost its checksum or ``run_id`` (a /2 file),
    holds a value out of range or whose parts disagree: the scores, the stages and the checkpoint that
    --resume and ``mbf eval --run`` trust. /1 files may lack the checksum; everything else is checked."""
    if data["schema"] == SCHEMA:
        for key in ("sha256", "run_id"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(
                    f"{path}: {key}={data.get(key)!r}: every {SCHEMA} file carries one; the file was edited "
                    "(a checksum cannot be dropped)"
                )
    if "sha256" in data and data["sha256"] != checksum(data):
        raise ValueError(
            f"{path}: its SHA-256 differs from its content: the file was edited or damaged after mbf wrote it"
        )
    n = len(data.get("stages") or [])
    for key in ("accuracy", "per_task"):
        if len(data.get(key) or []) != n:
            raise ValueError(f"{path}: {key} has {len(data.get(key) or [])} entries for {n} stages")
    checkpoint, want = data.get("checkpoint"), f"checkpoints/task-{n:02d}"
    continual = data.get("options") is not None  # multi-task keeps no checkpoint
    if (checkpoint is not None or (continual and n)) and checkpoint != want:
        raise ValueError(f"{path}: checkpoint={checkpoint!r} is not the last stage's ({want!r})")
    _check_fields(path, data)


def write(run_dir: str | Path, results: dict) -> Path:
    """Write ``run_dir/results.json`` atomically (with its ``sha256``): readers see the previous stage's
    or this one's.

    Raises:
        ValueError: on a NaN or infinite number (the file stays as it was).
    """
    results["sha256"] = checksum(results)
    return atomic_write_json(results, Path(run_dir) / "results.json")

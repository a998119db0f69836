"""Per-example predictions of every evaluation of a run, beside its results.json.

One JSON file per evaluation point, written atomically before results.json (the commit point), so a
committed stage always has its predictions, and a stage cut by a crash is written again when the run
resumes::

    OUT/predictions/zero-shot.json    the bare model, every task (FWT's reference)
    OUT/predictions/stage-NN.json     after stage NN (1-based): every task evaluated then

Schema ``"mbf-predictions/2"``: ``{"schema", "stage" (0 for zero-shot), "after" (the task trained, or
"zero-shot" / "all"), "run" (the run's identity: results.json's run_id, method, seed, order, tasks,
model and data fingerprints), "evals": [record, ...], "sha256" (of the other fields, canonical JSON)}``,
a record per (task, scorer, adapter)::

    task, scorer ("generate" | "rank"), adapter ("merged" | "finetuned" | "none": the bare model)
    ids       [int]: the examples' indices in the task's test set (the run's data_fingerprint fixes it)
    pred      [str]: what the model answered (generate: the decoded text; rank: the chosen option)
    gold      [str]: the reference answer
    correct   [float]: 1/0 exact match (or Rouge-L F1 for a generation task)
    option_scores  [[float | null]]: rank only, each option's summed log-likelihood, in the task's label
              order; null: left unfinished, its first tokens already below a finished option's score
    score     float: the mean of correct

Read back, a file is checked against what wrote it: its ``sha256`` (required in /2), its ``run`` against
results.json's identity, every ``correct`` in [0, 1], each ``score`` the mean of its ``correct``, and each
score results.json records (``accuracy``, ``zero_shot``, ``finetuned_diagonal``, by scorer) the file's. A
/1 file (written before ``run`` and ``sha256``) is read only in a run of results schema /1, its scores
checked the same way.

A finished run's files may be packed into one file, ``OUT/predictions.json.gz`` (``pack``; the committed
sweep runs are kept so, ``reports/pack_predictions.py``): gzip of canonical JSON ``{"schema":
"mbf-predictions-pack/1", "dropped": ["option_scores"], "stages": [stage, ...], "sha256"}``, a stage being
a file above without its ``sha256`` and each record without ``option_scores`` (read by no table: the
rank scorer's per-option log-likelihoods, two thirds of the bytes) and without ``ids`` where they are
0..n-1. ``read`` and ``load_run`` read either form (a stage's own file first), and a packed stage is
checked as a file is: the pack's ``sha256`` (required), then ranges, means, identity and scores against
results.json.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

from mbf.experiment import results as results_file
from mbf.io import atomic_write, atomic_write_json

__all__ = ["FOLDER", "LEGACY_SCHEMA", "PACK", "PACK_SCHEMA", "SCHEMA", "load_run", "pack", "read", "write"]

SCHEMA = "mbf-predictions/2"
LEGACY_SCHEMA = "mbf-predictions/1"  # before run and sha256: read only in a run of results schema /1
FOLDER = "predictions"
PACK = "predictions.json.gz"  # a finished run's files in one (``pack``)
PACK_SCHEMA = "mbf-predictions-pack/1"
DROPPED = ("option_scores",)  # what a pack leaves out of each record


def _name(stage: int) -> str:
    return "zero-shot.json" if stage == 0 else f"stage-{stage:02d}.json"


_checksum = results_file.checksum  # one canonical form for every checksummed file a run writes


def _check_checksum(path, data: dict, schema: str, wrote: str) -> None:
    """``data``'s required ``sha256`` is there and matches its content (``wrote``: how mbf made the file)."""
    if not isinstance(data.get("sha256"), str):
        raise ValueError(f"{path}: sha256={data.get('sha256')!r}: every {schema} file carries one; the "
                         "file was edited (a checksum cannot be dropped)")  # fmt: skip
    if data["sha256"] != _checksum(data):
        raise ValueError(f"{path}: its SHA-256 differs from its content: the file was edited or damaged "
                         f"after mbf {wrote} it")  # fmt: skip


def write(run_dir: str | Path, stage: int, after: str, evals: list[dict], run: dict | None = None) -> Path:
    """Write the predictions of evaluation point ``stage`` (0: zero-shot) atomically; compact JSON, with
    the identity ``run`` of the run that made them (``results.identity``) and a checksum."""
    data = {"schema": SCHEMA, "stage": stage, "after": after, "run": run, "evals": evals}
    data["sha256"] = _checksum(data)
    return atomic_write_json(data, Path(run_dir) / FOLDER / _name(stage), indent=None)


def _check_evals(path: Path | str, data: dict) -> None:
    """Each record's ``correct`` scores in [0, 1], as many as its ids, and its ``score`` their mean."""
    evals = data.get("evals")
    if not isinstance(evals, list):
        raise ValueError(f"{path}: evals={type(evals).__name__} must be a list of records")
    for k, e in enumerate(evals):
        where = f"{path}: evals[{k}]"
        named = isinstance(e, dict) and all(isinstance(e.get(f), str) for f in ("task", "scorer", "adapter"))
        if not named:
            raise ValueError(f"{where}: not a record with a task, scorer and adapter")
        correct, score = e.get("correct"), e.get("score")
        if not isinstance(correct, list) or not correct:
            raise ValueError(f"{where}.correct={correct!r} must be a non-empty list of scores")
        for i, c in enumerate(correct):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
                raise ValueError(f"{where}.correct[{i}]={c!r} is not a score in [0, 1]")
        if isinstance(e.get("ids"), list) and len(e["ids"]) != len(correct):
            raise ValueError(f"{where}.correct has {len(correct)} scores for {len(e['ids'])} ids")
        mean = sum(correct) / len(correct)
        if (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not math.isclose(score, mean, rel_tol=0, abs_tol=1e-9)
        ):
            raise ValueError(f"{where}.score={score!r} ({e['task']}, {e['scorer']}) is not the mean of its "
                             f"correct ({mean:.6g}): the file was edited")  # fmt: skip


def read(run_dir: str | Path, stage: int) -> dict | None:
    """The predictions of ``stage`` (0: zero-shot), from its file or else the run's pack (records without
    ``DROPPED``), or None when the run has neither (an older run); checked in themselves (checksum, ranges,
    each score the mean of its examples'; ``load_run`` checks them against the run's results.json too).

    Raises:
        ValueError: on a file (or pack) that is not JSON of this schema, lost or fails its checksum, or holds
            a value out of range (naming the file and the field).
    """
    path = Path(run_dir) / FOLDER / _name(stage)
    if not path.is_file():
        stages = _read_pack(run_dir)
        return None if stages is None else stages.get(stage)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in (SCHEMA, LEGACY_SCHEMA):
        raise ValueError(f"{path}: schema {schema!r} is not {SCHEMA!r}")
    if schema == SCHEMA:
        _check_checksum(path, data, SCHEMA, "wrote")
    if data.get("stage") != stage:
        raise ValueError(f"{path}: stage={data.get('stage')!r} is not {stage}")
    _check_evals(path, data)
    return data


def _where(run_dir: str | Path, stage: int) -> str:
    """How errors name ``stage``'s predictions: its file, or its place in the run's pack."""
    path, packed = Path(run_dir) / FOLDER / _name(stage), Path(run_dir) / PACK
    return str(path) if path.is_file() or not packed.is_file() else f"{packed}:{_name(stage)}"


def _read_pack(run_dir: str | Path) -> dict[int, dict] | None:
    """``{stage: predictions}`` from the run's pack (None: it has none), each checked as ``read`` checks a
    file; ``ids`` restored where the pack left them out (0..n-1)."""
    path = Path(run_dir) / PACK
    if not path.is_file():
        return None
    try:
        data = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, ValueError) as err:  # gzip's BadGzipFile is an OSError
        raise ValueError(f"{path}: not gzip-compressed JSON ({err})") from err
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != PACK_SCHEMA:
        raise ValueError(f"{path}: schema {schema!r} is not {PACK_SCHEMA!r}")
    _check_checksum(path, data, PACK_SCHEMA, "packed")
    if not isinstance(data.get("stages"), list):
        raise ValueError(f"{path}: stages={type(data.get('stages')).__name__} must be a list")
    out: dict[int, dict] = {}
    for k, st in enumerate(data["stages"]):
        stage = st.get("stage") if isinstance(st, dict) else None
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0 or stage in out:
            raise ValueError(f"{path}: stages[{k}].stage={stage!r} is not a stage of its own")
        where = f"{path}:{_name(stage)}"
        if st.get("schema") not in (SCHEMA, LEGACY_SCHEMA):
            raise ValueError(f"{where}: schema {st.get('schema')!r} is not {SCHEMA!r}")
        _check_evals(where, st)
        for e in st["evals"]:
            if "ids" not in e:
                e["ids"] = list(range(len(e["correct"])))
        out[stage] = st
    return out


def _packed(data: dict) -> dict:
    """A stage's file as its pack holds it: no checksum (the pack's covers it), no ``DROPPED`` fields, no
    ``ids`` where they are 0..n-1."""
    stage = {k: v for k, v in data.items() if k != "sha256"}
    stage["evals"] = [{k: v for k, v in e.items() if k not in DROPPED} for e in data["evals"]]
    for e in stage["evals"]:
        if e.get("ids") == list(range(len(e["correct"]))):
            del e["ids"]
    return stage


def pack(run_dir: str | Path, remove: bool = False) -> Path:
    """Pack a finished run's ``predictions/`` files into ``OUT/predictions.json.gz`` (deterministic bytes:
    packing again gives the same file), after checking each as ``load_run`` does (checksum, identity,
    scores against results.json); then read the pack back and check that every stage's records are the
    files' less ``DROPPED``. With ``remove``, the files are deleted then (and the folder, left empty).
    Nothing to pack (the files already packed and removed): the pack is checked and returned.

    Raises:
        ValueError: an unfinished run, a file ``load_run`` would refuse, a stage missing.
    """
    run_dir = Path(run_dir)
    results = results_file.read(run_dir)
    if not results.get("complete"):
        raise ValueError(f"{run_dir}: the run is not complete: its predictions are packed once it is")
    first, T = (0 if results.get("zero_shot") is not None else 1), len(results["stages"])
    files = [run_dir / FOLDER / _name(s) for s in range(first, T + 1)]
    if not any(f.is_file() for f in files) and (run_dir / PACK).is_file():
        _check_packed(run_dir, results, range(first, T + 1))
        return run_dir / PACK
    stages = []
    for s, f in zip(range(first, T + 1), files):
        if not f.is_file():
            raise ValueError(f"{f}: missing: a run's predictions are packed with every stage's file")
        data = read(run_dir, s)
        _check_against(str(f), data, results)
        stages.append(_packed(data))
    data = {"schema": PACK_SCHEMA, "dropped": list(DROPPED), "stages": stages}
    data["sha256"] = _checksum(data)
    blob = gzip.compress(json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(), 9,
                         mtime=0)  # fmt: skip
    path = atomic_write(run_dir / PACK, lambda tmp: tmp.write_bytes(blob))
    packed = _check_packed(run_dir, results, range(first, T + 1))
    for s, f in zip(range(first, T + 1), files):
        raw = read(run_dir, s)["evals"]
        if packed[s]["evals"] != [{k: v for k, v in e.items() if k not in DROPPED} for e in raw]:
            raise ValueError(f"{path}: {_name(s)} does not read back as {f}")  # not expected: a bug
    if remove:
        for f in files:
            f.unlink()
        if not any((run_dir / FOLDER).iterdir()):
            (run_dir / FOLDER).rmdir()
    return path


def _check_packed(run_dir: Path, results: dict, stages: range) -> dict[int, dict]:
    """The run's pack, every stage of ``stages`` in it and agreeing with results.json."""
    packed = _read_pack(run_dir)
    for s in stages:
        if s not in packed:
            raise ValueError(f"{run_dir / PACK}: holds no {_name(s)}, but results.json records it")
        _check_against(f"{run_dir / PACK}:{_name(s)}", packed[s], results)
    return packed


def _recorded(results: dict, stage: int, e: dict) -> tuple[str, float] | None:
    """``(field, score)``: what results.json records for record ``e`` of ``stage`` (None: nothing)."""
    if e["task"] not in results["tasks"]:
        return None
    j, scorer = results["tasks"].index(e["task"]), e["scorer"]
    headline = scorer == results_file.headline(results_file.scoring(results))
    # each scorer's row from its *_by_scorer field where recorded (the headline's is "accuracy" too): `mbf
    # compare --scorer rank` hands over results whose "accuracy" and "zero_shot" are the rank scorer's
    if stage == 0:
        name = "zero_shot" if headline else f"zero_shot_by_scorer.{scorer}"
        own = results.get("zero_shot") if headline else None
        row = (results.get("zero_shot_by_scorer") or {}).get(scorer, own)
        return (f"{name}[{j}]", row[j]) if row and j < len(row) else None
    if e["adapter"] == "finetuned":
        diag = results.get("finetuned_diagonal") or []
        ok = headline and stage <= len(diag)
        return (f"finetuned_diagonal[{stage - 1}]", diag[stage - 1]) if ok else None
    name = "accuracy" if headline else f"accuracy_by_scorer.{scorer}"
    matrix = (results.get("accuracy_by_scorer") or {}).get(scorer, results["accuracy"] if headline else None)
    if not matrix or stage > len(matrix):
        return None
    row = matrix[stage - 1]
    return (f"{name}[{stage - 1}][{j}]", row[j]) if j < len(row) else None


def _check_against(path: Path | str, data: dict, results: dict) -> None:
    """``data`` (a stage's predictions) is the run's: its identity is results.json's, and every score
    results.json records of it is the file's."""
    run, want = data.get("run"), results_file.identity(results)
    if results.get("schema") == results_file.SCHEMA:  # its run wrote every file with its identity
        if data["schema"] != SCHEMA:
            raise ValueError(f"{path}: schema {data['schema']!r} in a run of {results_file.SCHEMA}, whose "
                             f"predictions are {SCHEMA}: not this run's file")  # fmt: skip
        if not isinstance(run, dict):
            raise ValueError(f"{path}: run={run!r}: not this run's predictions")
    if isinstance(run, dict):  # a run of results schema /1 resumed since: its later files carry it
        diffs = [f"run.{k}={run.get(k)!r} (results.json: {v!r})" for k, v in want.items() if run.get(k) != v]
        if diffs:
            raise ValueError(f"{path}: {'; '.join(diffs[:2])}: predictions of another run")
    for k, e in enumerate(data["evals"]):
        recorded = _recorded(results, data["stage"], e)
        if recorded is not None and abs(round(e["score"], 4) - recorded[1]) > 1e-9:
            raise ValueError(f"{path}: evals[{k}].score={e['score']:.4f} ({e['task']}, {e['scorer']}, "
                             f"{e['adapter']}) but results.json's {recorded[0]}={recorded[1]}: the files "
                             "disagree (one was edited)")  # fmt: skip


def load_run(run_dir: str | Path, results: dict, scorer: str) -> dict | None:
    """The correctness vectors a paired comparison needs, for ``scorer``, from a complete run's files:
    ``{task: {"final", "diag", "next", "zero"}}`` (lists of per-example scores; ``diag``, ``next`` and
    ``zero`` only where the run has them: multi-task has one stage), with the merged adapter, from the
    stages' files or the run's pack. None when a stage's predictions are missing (a run older than them).

    Raises:
        ValueError: a file that ``read`` refuses, that is not this run's (its identity), or whose scores
            are not those results.json records, naming the file and the field.
        FileNotFoundError: a stage's file missing in a run of ``results.SCHEMA`` that records its
            ``predictions`` folder (it wrote every one).
    """
    tasks, T = results["tasks"], len(results["stages"])
    # a run of this schema that records its predictions folder wrote every stage's file: none may be missing
    current = results.get("schema") == results_file.SCHEMA and results.get("predictions") == FOLDER
    stages = {}
    for s in range(0 if results.get("zero_shot") is not None else 1, T + 1):
        data = read(run_dir, s)
        if data is None:
            if current:
                packed = f" (nor in {PACK})" if (Path(run_dir) / PACK).is_file() else ""
                raise FileNotFoundError(
                    f"{Path(run_dir) / FOLDER / _name(s)}: missing{packed}, but results.json records {T} "
                    "stages (every stage writes its predictions)"
                )
            if s == 0:
                continue
            return None
        _check_against(_where(run_dir, s), data, results)
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

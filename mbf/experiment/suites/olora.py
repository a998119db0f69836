"""The O-LoRA / SAPT continual-learning benchmark layout on disk, with the paper's task orders.

``load_benchmark(data_dir, order)`` reads the ``CL_Benchmark`` folder of O-LoRA (Wang et al., 2023)
or SAPT, which users obtain themselves (nothing is downloaded): ``O1``–``O3`` the standard 4-task
benchmark, ``O4``–``O6`` the 15-task long sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

from mbf.experiment.tasks import Example, Task

__all__ = ["ORDERS", "load_benchmark", "load_task_dir"]

# -- folders and records --------------------------------------------------------------

# Task orders of O-LoRA (Wang et al., 2023, appendix) used by SAPT and SLAO: O1-O3 the standard
# 4-task benchmark, O4-O6 the 15-task long sequence.
ORDERS = {
    "O1": ("dbpedia", "amazon", "yahoo", "agnews"),
    "O2": ("dbpedia", "amazon", "agnews", "yahoo"),
    "O3": ("yahoo", "amazon", "agnews", "dbpedia"),
    "O4": ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon", "sst2",
           "dbpedia", "agnews", "multirc", "yahoo"),
    "O5": ("multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia",
           "agnews", "yelp", "amazon", "yahoo"),
    "O6": ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews",
           "yahoo", "multirc", "boolqa", "wic"),
}  # fmt: skip

# folder names differ between the two repositories (O-LoRA: BoolQA, SST-2; SAPT: boolq, sst2)
_ALIASES = {"boolqa": ("boolqa", "boolq"), "sst2": ("sst2", "sst-2"), "agnews": ("agnews", "ag_news")}

# O-LoRA's instruction per benchmark family (instruction_config_cl.json), used when a file has none
_FAMILY_INSTRUCTIONS = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.",
}
_DEFAULT_INSTRUCTION = "Answer with one of the options."
CLASSIFICATION_MAX_LABELS = 50  # more distinct answers than this: a generation task (Rouge-L)


def _read_json(path: Path, text: str | None = None, line: int | None = None):
    """``json.loads`` of the file (or of one of its lines), its errors naming the file and line.

    Raises:
        ValueError: on text that is not UTF-8 or not JSON.
    """
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    except json.JSONDecodeError as err:
        at = f"line {line}" if line is not None else f"line {err.lineno} column {err.colno}"
        raise ValueError(f"{path}: not valid JSON at {at}: {err.msg}") from err


def _read_records(path: Path) -> tuple[list, str | None]:
    """Records and the file's own instruction (SAPT's ``Definition``) from JSON or JSONL.

    Raises:
        ValueError: on a file that is not UTF-8 JSON (JSONL), or holds no list of records.
    """
    if path.suffix == ".jsonl":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
        return [_read_json(path, s, i + 1) for i, s in enumerate(lines) if s.strip()], None
    data = _read_json(path)
    definition = None
    if isinstance(data, dict):  # SAPT / SuperNI: {"Definition": [...], "Instances": [...]}
        definition = data.get("Definition")
        if isinstance(definition, list):
            definition = definition[0] if definition else None
        data = data.get("Instances", [])
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of records (or SAPT's Instances), got {type(data).__name__}"
        )
    return data, definition if isinstance(definition, str) else None


def _to_example(rec: dict, path: Path, i: int) -> Example:
    if not isinstance(rec, dict):
        raise ValueError(
            f"{path}: record {i} is a {type(rec).__name__}, not an object with input/output fields"
        )
    inp = rec.get("input", rec.get("sentence"))
    out = rec.get("output", rec.get("label"))
    if isinstance(out, list):  # SuperNI keeps a list of acceptable outputs
        out = out[0] if out else None
    if inp is None or out is None:
        raise ValueError(
            f"{path}: record {i} needs input/sentence and output/label fields, has {sorted(rec)}"
        )
    if rec.get("instruction"):
        inp = f"{rec['instruction']}\n{inp}"
    return Example(str(inp).strip(), str(out).strip())


def _find_split(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.json", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_task_dir(
    folder: str | Path, name: str | None = None, max_train: int | None = None, max_test: int | None = None
) -> Task:
    """One task from a folder with ``train`` and ``test`` (or ``dev``) ``.json``/``.jsonl`` files.

    Records are ``{"input", "output"}`` (SAPT, JSONL), ``{"sentence", "label"}`` (O-LoRA) or
    carry an ``"instruction"`` field. ``labels.json`` (O-LoRA) lists the options; they are shown in
    the prompt as O-LoRA does. A task with options, or whose training answers take at most
    ``CLASSIFICATION_MAX_LABELS`` distinct values, is scored by exact match; any other (SuperNI's
    free-form generation tasks) by Rouge-L, as the paper scores SuperNI.

    Raises:
        FileNotFoundError: when the folder lacks a train or a test/dev file.
        ValueError: on a file that is not UTF-8 JSON, a record that is not an object or lacks an input
            or an output, or a label missing from ``labels.json`` (each naming the file).
    """
    folder = Path(folder)
    name = name or folder.name
    train_path = _find_split(folder, "train")
    test_path = _find_split(folder, "test") or _find_split(folder, "dev")
    if train_path is None or test_path is None:
        raise FileNotFoundError(
            f"{folder}: task {name!r} needs train.json(l) and test.json(l) or dev.json(l)"
        )
    train_recs, definition = _read_records(train_path)
    test_recs, _ = _read_records(test_path)
    labels = _read_json(folder / "labels.json") if (folder / "labels.json").is_file() else []
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ValueError(f"{folder / 'labels.json'}: expected a list of label strings")
    instruction = definition or _FAMILY_INSTRUCTIONS.get(folder.parent.name, _DEFAULT_INSTRUCTION)
    train = [_to_example(r, train_path, i) for i, r in enumerate(train_recs)][:max_train]
    test = [_to_example(r, test_path, i) for i, r in enumerate(test_recs)][:max_test]
    for path, examples in ((train_path, train), (test_path, test)):
        for i, ex in enumerate(examples):
            if labels and ex.output not in labels:  # never an answer the prompt's options cannot give
                raise ValueError(f"{path}: record {i}: label {ex.output!r} is not in {folder}/labels.json")
    classification = labels or len({ex.output for ex in train}) <= CLASSIFICATION_MAX_LABELS
    metric = "exact" if classification else "rougeL"
    return Task(name, instruction, train, test, labels=list(labels), metric=metric, source=str(folder))


def _task_folder(data_dir: Path, name: str) -> Path:
    wanted = {a.lower() for a in _ALIASES.get(name, (name,))}
    hits = sorted(p for p in data_dir.rglob("*") if p.is_dir() and p.name.lower() in wanted)
    hits = [p for p in hits if _find_split(p, "train")]
    if not hits:
        raise FileNotFoundError(
            f"{data_dir}: no folder for task {name!r} (looked for {sorted(wanted)} with train.json)"
        )
    if len(hits) > 1:  # which one a run used would depend on the search order
        shown = ", ".join(str(p.relative_to(data_dir)) for p in hits)
        raise ValueError(f"{data_dir}: {len(hits)} folders for task {name!r}: {shown}; keep one")
    return hits[0]


def load_benchmark(
    data_dir: str | Path, order: str | list[str], max_train: int | None = None, max_test: int | None = None
) -> list[Task]:
    """The tasks of ``order`` (``"O1"``…``"O6"`` or a list of task names) found under ``data_dir``.

    Task folders are searched recursively by name (``CL_Benchmark/TC/dbpedia`` in O-LoRA,
    ``CL_Benchmark/Long_Sequence/dbpedia`` in SAPT), case-insensitively.

    Raises:
        ValueError: on an unknown order name.
        FileNotFoundError: on a missing data dir or task folder.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)} or list task names")
        names = ORDERS[order]
    else:
        names = tuple(order)
    return [load_task_dir(_task_folder(data_dir, n), n, max_train, max_test) for n in names]

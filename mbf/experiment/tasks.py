"""Task suites: the built-in generated suite and the O-LoRA / SAPT benchmark folders.

A task is a name, an instruction and lists of ``Example(input, output)`` for training and
testing; a suite is an ordered list of tasks. Prompts are plain text (no chat template: it would
add ~20 tokens per example for nothing)::

    {instruction}
    Input: {input}
    Answer: {output}<eos>

The loss is taken on `` {output}<eos>`` only; evaluation decodes greedily and scores exact match
after stripping whitespace.

Two sources (``load_suite`` picks one and describes it for results.json):

- ``builtin_suite(seed)``: five generated tasks that share one input format — four words, one
  animal, one color, one fruit and one object, shuffled — and one answer space (a word of the
  input), each asking for a different word: the color, the first word, the animal, the last word,
  the fruit. Every task is easy for a 135M Llama alone, but the tasks interfere directly: the
  adapter that learned "answer the fruit" answers the fruit to the color question, so sequential
  LoRA forgets, while a model that reads the instruction can solve all five (the multi-task
  upper bound). Deterministic from ``seed``; all words are single tokens in SmolLM2's vocabulary.
- ``load_benchmark(data_dir, order)``: the O-LoRA / SAPT continual-learning benchmark layout on
  disk, with the paper's task orders (``O1``–``O6``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ORDERS",
    "Example",
    "Task",
    "builtin_suite",
    "load_benchmark",
    "load_suite",
    "load_task_dir",
]


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass
class Task:
    """One task of a suite: ``prompt(ex)`` is what the model sees, ``ex.output`` what it must answer."""

    name: str
    instruction: str
    train: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)  # the answer options, when the task is a classification

    def prompt(self, ex: Example) -> str:
        return f"{self.instruction}\nInput: {ex.input}\nAnswer:"

    def target(self, ex: Example) -> str:
        return " " + ex.output.strip()


# -- the built-in suite -----------------------------------------------------------------------------

# single tokens (with the leading space) in SmolLM2's tokenizer; checked by tests/test_tasks.py
ANIMALS = ("cat", "dog", "horse", "cow", "sheep", "pig", "goat", "mouse", "lion", "tiger", "bear", "wolf")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "grey")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum")
OBJECTS = ("table", "chair", "spoon", "knife", "cup", "lamp", "door", "bed", "shoe", "hat", "box", "pen")

# (name, instruction, which word of the shuffled (animal, color, fruit, object) list is the answer)
BUILTIN_TASKS = (
    ("color", "Which word is a color?", lambda words, cats: words[cats.index("color")]),
    ("first", "Which word comes first?", lambda words, cats: words[0]),
    ("animal", "Which word is an animal?", lambda words, cats: words[cats.index("animal")]),
    ("last", "Which word comes last?", lambda words, cats: words[-1]),
    ("fruit", "Which word is a fruit?", lambda words, cats: words[cats.index("fruit")]),
)


def _draw(rng: random.Random) -> tuple[list[str], list[str]]:
    pairs = [
        (rng.choice(ANIMALS), "animal"),
        (rng.choice(COLORS), "color"),
        (rng.choice(FRUITS), "fruit"),
        (rng.choice(OBJECTS), "object"),
    ]
    rng.shuffle(pairs)
    return [w for w, _ in pairs], [c for _, c in pairs]


def builtin_suite(seed: int = 0, n_train: int = 300, n_test: int = 100, n_tasks: int = 5) -> list[Task]:
    """The built-in suite: ``n_tasks`` (≤ 5) generated tasks in their fixed order.

    Test inputs never occur in the same task's training set. Same seed, same suite.

    Raises:
        ValueError: on ``n_tasks`` outside ``[1, 5]`` or non-positive sizes.
    """
    if not 1 <= n_tasks <= len(BUILTIN_TASKS):
        raise ValueError(f"n_tasks={n_tasks} must be in [1, {len(BUILTIN_TASKS)}]")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must be positive")
    tasks = []
    for t, (name, instruction, answer) in enumerate(BUILTIN_TASKS[:n_tasks]):
        rng = random.Random(f"mbf-builtin-{seed}-{t}")  # str seeds hash deterministically
        seen: set[str] = set()
        splits: list[list[Example]] = [[], []]
        for split, n in ((1, n_test), (0, n_train)):  # test first, so train can avoid its inputs
            while len(splits[split]) < n:
                words, cats = _draw(rng)
                text = " ".join(words)
                if split == 0 and text in seen:
                    continue
                seen.add(text)
                splits[split].append(Example(text, answer(words, cats)))
        tasks.append(Task(name, instruction, train=splits[0], test=splits[1]))
    return tasks


# -- the O-LoRA / SAPT benchmark layout --------------------------------------------------------------

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


def _read_records(path: Path) -> tuple[list[dict], str | None]:
    """Records and the file's own instruction (SAPT's ``Definition``) from JSON or JSONL."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()], None
    data = json.loads(text)
    if isinstance(data, dict):  # SAPT / SuperNI: {"Definition": [...], "Instances": [...]}
        definition = data.get("Definition")
        if isinstance(definition, list):
            definition = definition[0] if definition else None
        return list(data.get("Instances", [])), definition
    return list(data), None


def _to_example(rec: dict, path: Path, i: int) -> Example:
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
    the prompt as O-LoRA does.

    Raises:
        FileNotFoundError: when the folder lacks a train or a test/dev file.
        ValueError: on a record without an input or an output.
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
    labels = json.loads((folder / "labels.json").read_text()) if (folder / "labels.json").is_file() else []
    instruction = definition or _FAMILY_INSTRUCTIONS.get(folder.parent.name, _DEFAULT_INSTRUCTION)
    if labels:
        instruction = f"{instruction}\nOptions: {', '.join(labels)}"
    train = [_to_example(r, train_path, i) for i, r in enumerate(train_recs)][:max_train]
    test = [_to_example(r, test_path, i) for i, r in enumerate(test_recs)][:max_test]
    return Task(name, instruction, train=train, test=test, labels=list(labels))


def _task_folder(data_dir: Path, name: str) -> Path:
    wanted = {a.lower() for a in _ALIASES.get(name, (name,))}
    hits = sorted(p for p in data_dir.rglob("*") if p.is_dir() and p.name.lower() in wanted)
    hits = [p for p in hits if _find_split(p, "train")]
    if not hits:
        raise FileNotFoundError(
            f"{data_dir}: no folder for task {name!r} (looked for {sorted(wanted)} with train.json)"
        )
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


def load_suite(
    suite: str,
    *,
    n_train: int,
    n_test: int,
    suite_seed: int = 0,
    data_dir: str | Path | None = None,
    order: str = "O1",
) -> tuple[list[Task], dict]:
    """The tasks of ``suite`` and the fields that say where they came from (saved in results.json).

    Args:
        suite: ``"builtin"`` (generated from ``suite_seed``) or ``"olora"`` (``order`` under ``data_dir``).
        n_train: training examples per task (at most, for ``olora``).
        n_test: test examples per task (at most, for ``olora``).
        suite_seed: seed of the built-in generator.
        data_dir: root of the O-LoRA / SAPT ``CL_Benchmark`` folders.
        order: ``"O1"``…``"O6"``, or comma-separated task names.

    Returns:
        ``(tasks, meta)``; ``meta`` holds ``suite``, ``n_train``, ``n_test`` and ``suite_seed`` or
        ``order`` / ``data_dir``.

    Raises:
        ValueError: on an unknown suite or order, or a missing ``data_dir`` for ``olora``.
        FileNotFoundError: on a missing data dir or task folder.
    """
    meta = {"suite": suite}
    if suite == "builtin":
        tasks = builtin_suite(suite_seed, n_train=n_train, n_test=n_test)
        meta["suite_seed"] = suite_seed
    elif suite == "olora":
        if data_dir is None:
            raise ValueError("the olora suite needs a data dir (the CL_Benchmark folder of O-LoRA or SAPT)")
        names = order.split(",") if "," in order else order
        tasks = load_benchmark(data_dir, names, max_train=n_train, max_test=n_test)
        meta.update(order=order, data_dir=str(data_dir))
    else:
        raise ValueError(f"unknown suite {suite!r}; choose builtin or olora")
    return tasks, {**meta, "n_train": n_train, "n_test": n_test}

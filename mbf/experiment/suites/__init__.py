"""Task suites, and ``load_suite`` which picks one and says where its tasks came from.

- ``real`` (``suites.real``): human-written text from installed data packages, three standard 4-task
  orders and three long 8-task orders: the paper's regime on real data.
- ``domains`` (``suites.domains``): five generated tasks with distinct input domains and answer
  vocabularies: the paper's regime, offline and fast.
- ``conflict`` (``suites.conflict``, alias ``builtin``, its former name): five generated tasks on
  identical inputs that differ only by the instruction: a stress test, the worst case for merging.
- ``olora`` (``suites.olora``): the O-LoRA / SAPT ``CL_Benchmark`` folders on disk, orders O1–O6.
"""

from __future__ import annotations

from pathlib import Path

from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.suites.domains import domains_suite
from mbf.experiment.suites.olora import ORDERS as OLORA_ORDERS
from mbf.experiment.suites.olora import load_benchmark
from mbf.experiment.suites.real import ORDERS as REAL_ORDERS
from mbf.experiment.suites.real import MissingData, real_suite
from mbf.experiment.tasks import Task, check_tasks

__all__ = ["DEFAULT_ORDER", "SUITES", "MissingData", "load_suite"]

SUITES = ("real", "domains", "conflict", "builtin", "olora")
DEFAULT_ORDER = {"real": "std1", "olora": "O1"}  # the suites that take --order


def load_suite(
    suite: str,
    *,
    n_train: int,
    n_test: int,
    suite_seed: int = 0,
    data_dir: str | Path | None = None,
    order: str | None = None,
    split: str = "test",
) -> tuple[list[Task], dict]:
    """The tasks of ``suite`` and the fields that say where they came from (saved in results.json).

    Args:
        suite: one of ``SUITES`` (``builtin`` is the conflict suite's former name, kept for old runs).
        n_train: training examples per task (at most, for ``olora``).
        n_test: test examples per task (at most, for ``olora``).
        suite_seed: seed of the generated suites and of the real suite's subsampling.
        data_dir: ``olora``: root of the ``CL_Benchmark`` folders; ``real``: a folder holding the data
            packages' folders instead of the installed packages.
        order: ``real``: ``std1``…``std3``, ``long1``…``long3`` or task names; ``olora``: ``O1``…``O6``
            or task names (comma-separated); default ``DEFAULT_ORDER``.
        split: ``real``: ``"validation"`` scores on held-out training examples (``real_suite``).

    Returns:
        ``(tasks, meta)``; ``meta`` holds ``suite``, ``n_train``, ``n_test``, the seed or order and
        data dir that apply, and ``task_metrics`` (how each task is scored).

    Raises:
        ValueError: on an unknown suite or order, an order or data dir given to a suite without one,
            a missing ``data_dir`` for ``olora``, a task without training or test examples, or a data
            file that cannot be read (naming it).
        FileNotFoundError: on a missing data dir or task folder (``MissingData``: a data package).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if order is not None and suite not in DEFAULT_ORDER:
        raise ValueError(f"--order {order!r} applies to --suite real or olora, not {suite}")
    if split != "test" and suite != "real":
        raise ValueError(f"--eval-split {split} applies to --suite real, not {suite}")
    if data_dir is not None and suite not in ("real", "olora"):
        raise ValueError(f"--data-dir applies to --suite real or olora, not {suite}")
    order = order or DEFAULT_ORDER.get(suite)
    meta: dict = {"suite": suite}
    if suite in ("conflict", "builtin"):
        tasks = conflict_suite(suite_seed, n_train=n_train, n_test=n_test)
        meta["suite_seed"] = suite_seed
    elif suite == "domains":
        tasks = domains_suite(suite_seed, n_train=n_train, n_test=n_test)
        meta["suite_seed"] = suite_seed
    elif suite == "real":
        tasks = real_suite(order, suite_seed, n_train=n_train, n_test=n_test, data_dir=data_dir, split=split)
        meta.update(order=order, suite_seed=suite_seed, sources={t.name: t.source for t in tasks})
        if split != "test":  # (absent: the test split, as every earlier run)
            meta["eval_split"] = split
        if data_dir is not None:
            meta["data_dir"] = str(data_dir)
    else:
        if data_dir is None:
            raise ValueError("--suite olora needs --data-dir (the CL_Benchmark folder of O-LoRA or SAPT)")
        names = order.split(",") if "," in order else order
        tasks = load_benchmark(data_dir, names, max_train=n_train, max_test=n_test)
        meta.update(order=order, data_dir=str(data_dir))
    check_tasks(tasks)  # an empty split or a bad record fails here, before any model is loaded
    meta["task_metrics"] = [t.metric for t in tasks]
    return tasks, {**meta, "n_train": n_train, "n_test": n_test}


# the orders each suite accepts, for --help
ORDERS = {"real": REAL_ORDERS, "olora": OLORA_ORDERS}

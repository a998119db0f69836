"""Paired bootstrap confidence intervals: pure numpy, no model, no files.

The data are *units* (one per replication: an order and a seed), each holding, per task, arrays of
per-example scores over the same test examples (the final score of a method, its score right after
learning the task, a baseline's final score...). A bootstrap replicate draws the units with
replacement (when there are several) and, inside each unit, the test examples of each task with
replacement, one draw of indices per (unit, task) shared by every array of that task: that shared
draw is the pairing (two methods answered the same questions; a task's final and diagonal scores are
on the same examples). A statistic maps the per-task means of one replicate to a number; the
interval is the percentile interval of that statistic over the replicates, and the estimate its
value on the data as they are (averaged over units).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "paired_bootstrap"]

Unit = Mapping[str, Mapping[str, "np.ndarray | list[float]"]]  # task -> name -> per-example scores
Statistic = Callable[[dict[str, dict[str, np.ndarray]]], np.ndarray]  # task -> name -> (n_boot,) means


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval."""

    estimate: float  # the statistic on the data as they are (mean over units)
    low: float  # lower bound of the percentile interval
    high: float  # upper bound
    level: float = 0.95  # coverage the interval aims at

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (for a difference: distinguishable from no effect)."""
        return not (self.low <= 0.0 <= self.high)

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "significant": self.significant}  # fmt: skip


def _means(unit: Unit, idx: dict[str, np.ndarray] | None) -> dict[str, dict[str, np.ndarray]]:
    """Per task and array, the mean over the examples ``idx[task]`` (B, n) selects, shape (B,); over
    every example, shape (1,), when ``idx`` is None."""
    out = {}
    for task, arrays in unit.items():
        out[task] = {}
        for name, values in arrays.items():
            v = np.asarray(values, dtype=np.float64)
            out[task][name] = v[idx[task]].mean(axis=1) if idx is not None else v.mean(keepdims=True)
    return out


def paired_bootstrap(
    units: list[Unit], statistic: Statistic, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """The estimate of ``statistic`` and its paired-bootstrap percentile interval.

    Args:
        units: the replications; in each, every array of one task has one entry per test example.
        statistic: per-task means of one replicate (arrays of shape (B,)) -> the statistic, shape (B,).
        n_boot: bootstrap replicates.
        seed: seeds the draws (the same data and seed give the same interval).
        level: the interval's coverage.

    Raises:
        ValueError: on no units, or a task whose arrays differ in length (they must be paired).
    """
    if not units:
        raise ValueError("paired_bootstrap: no units")
    rng = np.random.default_rng(seed)
    per_unit, point = [], []
    for u, unit in enumerate(units):
        idx = {}
        for task, arrays in unit.items():
            sizes = {len(v) for v in arrays.values()}
            if len(sizes) != 1 or 0 in sizes:
                raise ValueError(
                    f"unit {u}, task {task!r}: paired arrays need one common, non-zero length: {sizes}"
                )
            idx[task] = rng.integers(0, sizes.pop(), size=(n_boot, len(next(iter(arrays.values())))))
        per_unit.append(np.asarray(statistic(_means(unit, idx)), dtype=np.float64))  # (B,)
        point.append(float(np.asarray(statistic(_means(unit, None))).reshape(-1)[0]))
    S = np.stack(per_unit)  # (U, B)
    if len(units) > 1:  # the replications themselves vary: draw them too
        pick = rng.integers(0, len(units), size=(n_boot, len(units)))
        boot = S[pick, np.arange(n_boot)[:, None]].mean(axis=1)
    else:
        boot = S[0]
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return Interval(float(np.mean(point)), float(low), float(high), level)

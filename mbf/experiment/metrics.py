"""Scoring: exact match of one answer, the continual-learning metrics of an accuracy matrix, and
their summary over seeds."""

from __future__ import annotations

import math
import statistics

__all__ = ["accuracy_metrics", "exact_match", "mean_std", "pct"]


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after stripping whitespace (the first line of the prediction counts)."""
    return prediction.strip().split("\n")[0].strip() == answer.strip()


def accuracy_metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """AA and BWT of an accuracy matrix.

    ``matrix[i][j]`` is the accuracy on task ``j`` after training task ``i`` (0-based, ``j ≤ i``;
    entries above the diagonal may be None). With ``T`` tasks:
    ``AA = mean_j a[T-1][j]``, ``BWT = mean_{j<T-1} (a[T-1][j] − a[j][j])`` (None for one task).

    Returns:
        ``{"AA": float, "BWT": float | None}``.

    Raises:
        ValueError: on an empty matrix or a missing entry in the last row or the diagonal.
    """
    if not matrix:
        raise ValueError("empty accuracy matrix")
    T = len(matrix)
    last = matrix[-1]
    if len(last) < T or any(last[j] is None for j in range(T)):
        raise ValueError(f"the last row needs all {T} accuracies, got {last}")
    if any(len(matrix[j]) <= j or matrix[j][j] is None for j in range(T)):
        raise ValueError("the diagonal a[j][j] is incomplete")
    aa = sum(last[j] for j in range(T)) / T
    bwt = sum(last[j] - matrix[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None
    return {"AA": aa, "BWT": bwt}


def mean_std(xs: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the non-None values (std 0 for one value; NaN, NaN for none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(x: float | None) -> str:
    """An accuracy in percent with one decimal: ``0.423`` → ``"42.3"``; None → ``"–"``."""
    return "–" if x is None else f"{100 * x:.1f}"

"""Scoring: exact match or Rouge-L of one answer, the continual-learning metrics of an accuracy
matrix (AA, BWT, FWT), and their summary over seeds and orders."""

from __future__ import annotations

import math
import statistics
from functools import cache

from mbf._optional import require

__all__ = ["accuracy_metrics", "answer_score", "exact_match", "mean_std", "pct", "rouge_l"]


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after stripping whitespace (the first line of the prediction counts)."""
    return _first_line(prediction) == answer.strip()


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


@cache
def _rouge_scorer():
    require("Rouge-L (generation tasks)", ("rouge_score",), extra="data")
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])  # the paper's (and SuperNI's) metric, no stemming


def rouge_l(prediction: str, answer: str) -> float:
    """Rouge-L F1 (0..1) of the prediction's first line against the answer (``rouge-score``).

    Raises:
        MissingDependency: when ``rouge-score`` is not installed (``pip install 'mbf-lora[data]'``).
    """
    return _rouge_scorer().score(answer.strip(), _first_line(prediction))["rougeL"].fmeasure


def answer_score(metric: str, prediction: str, answer: str) -> float:
    """1.0 / 0.0 for ``"exact"``, Rouge-L F1 for ``"rougeL"``.

    Raises:
        ValueError: on an unknown metric.
    """
    if metric == "exact":
        return float(exact_match(prediction, answer))
    if metric == "rougeL":
        return rouge_l(prediction, answer)
    raise ValueError(f"unknown metric {metric!r}; choose exact or rougeL")


def accuracy_metrics(
    matrix: list[list[float | None]], zero_shot: list[float] | None = None
) -> dict[str, float | None]:
    """AA, BWT and FWT of an accuracy matrix.

    ``matrix[i][j]`` is the accuracy on task ``j`` after training task ``i`` (0-based, ``j ≤ i``, and
    ``j = i + 1``: the next task, before it is trained, for FWT). With ``T`` tasks:
    ``AA = mean_j a[T-1][j]``, ``BWT = mean_{j<T-1} (a[T-1][j] − a[j][j])`` (None for one task) and
    ``FWT = mean_{j≥1} (a[j-1][j] − z[j])`` with ``z`` the zero-shot accuracy of the base model (Lopez-Paz
    & Ranzato's forward transfer, the base model as the reference): what training the earlier tasks
    did to a task not trained yet. None without ``zero_shot`` or the next-task entries.

    Returns:
        ``{"AA": float, "BWT": float | None, "FWT": float | None}``.

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
    ahead = [matrix[j - 1][j] if len(matrix[j - 1]) > j else None for j in range(1, T)]
    fwt = None
    if T > 1 and zero_shot is not None and len(zero_shot) >= T and None not in ahead:
        fwt = sum(a - z for a, z in zip(ahead, zero_shot[1:])) / (T - 1)
    return {"AA": aa, "BWT": bwt, "FWT": fwt}


def mean_std(xs: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the non-None values (std 0 for one value; NaN, NaN for none)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(x: float | None) -> str:
    """An accuracy in percent with one decimal: ``0.423`` → ``"42.3"``; None → ``"–"``."""
    return "–" if x is None else f"{100 * x:.1f}"

"""Figures of runs: one run's accuracy heatmap, and several methods compared (AA/BWT, curves, memory).

Every figure is written through ``mbf.io.atomic_write``: a reader never sees half a PNG, and two
processes drawing into one folder never share a temporary file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from mbf._optional import pyplot
from mbf.experiment.metrics import mean_std, pct
from mbf.io import atomic_write

__all__ = ["MEMORY", "compare_figure", "heatmap", "memory_curve", "memory_figure"]

# what a method holds after each task (results.json per_task): adapters, AdamW's state, replayed data
MEMORY = ("adapter_bytes", "optimizer_bytes", "buffer_bytes")


def _save(plt, fig, path: Path, dpi: int) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)


def heatmap(results: dict, path: Path) -> None:
    """``accuracy[i][j]`` as a grid (rows: after training, columns: evaluated on), written to ``path``."""
    plt = pyplot()
    tasks, acc = results["tasks"], results["accuracy"]
    grid = [[(row[j] if j < len(row) else math.nan) for j in range(len(tasks))] for row in acc]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), max(2.6, 0.8 + 0.6 * len(grid))))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                color = "w" if v < 0.6 else "k"
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(grid)), results["stages"])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    m = results["metrics"]
    scores = f"AA {pct(m['AA'])} BWT {pct(m['BWT'])} FWT {pct(m.get('FWT'))}"
    title = f"{results['method']} seed {results['seed']}: {scores}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(plt, fig, path, dpi=110)


def _bars(ax, groups: dict[str, list[dict]], intervals: dict | None = None) -> None:
    """AA, BWT and FWT per group, with the paired-bootstrap interval as error bars where ``intervals``
    has it (else the std over runs)."""
    labels = list(groups)
    x = range(len(labels))
    w = 0.27
    cis = (intervals or {}).get("methods", {})
    for offset, key in ((-w, "AA"), (0.0, "BWT"), (w, "FWT")):
        means, errs = [], [[], []]
        for k in labels:
            iv = cis.get(k, {}).get(key)
            if iv is not None:
                means.append(100 * iv.estimate)
                errs[0].append(100 * (iv.estimate - iv.low))
                errs[1].append(100 * (iv.high - iv.estimate))
                continue
            m, sd = mean_std([r["metrics"].get(key) for r in groups[k]])
            means.append(100 * (0 if math.isnan(m) else m))
            errs[0].append(100 * (0 if math.isnan(sd) else sd))
            errs[1].append(errs[0][-1])
        ax.bar([i + offset for i in x], means, w, yerr=errs, label=key, capsize=3)
    ax.axhline(0, color="k", lw=0.5)
    ticks = [_with_units(k, cis[k]) if k in cis else k for k in labels]
    ax.set_xticks(list(x), ticks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    what = "paired 95% interval" if cis else "mean ± std over runs"
    ax.set_title(f"AA, BWT and FWT ({what})", fontsize=9)
    ax.legend()


def _counted(label: str, n: int, what: str) -> str:
    """``slao (9 units)``, ``multi-task (1 run)``: a label with how many of ``what`` it stands for."""
    return f"{label} ({n} {what}{'' if n == 1 else 's'})"


def _with_units(label: str, row: dict | None) -> str:
    """``slao (9 units)``: how many (order, seed) units an interval is over, so that a one-unit bar is not
    read like a nine-unit one."""
    n = (row or {}).get("units")
    return label if n is None else _counted(label, n, "unit")


def _differences(ax, intervals: dict) -> None:
    """ΔAA, ΔBWT, ΔFWT of each method minus the baseline with their paired intervals; ``n.s.`` over a
    bar whose interval crosses 0; each label says how many units its interval is over."""
    diffs = intervals["vs_baseline"]
    labels = list(diffs)
    w = 0.27
    for offset, key in ((-w, "AA"), (0.0, "BWT"), (w, "FWT")):
        for i, k in enumerate(labels):
            iv = diffs[k].get(key)
            if iv is None:
                continue
            err = [[100 * (iv.estimate - iv.low)], [100 * (iv.high - iv.estimate)]]
            color = {"AA": "C0", "BWT": "C1", "FWT": "C2"}[key]
            ax.bar([i + offset], [100 * iv.estimate], w, yerr=err, capsize=3, color=color,
                   label=key if i == 0 else None)  # fmt: skip
            if not iv.significant:
                ax.text(i + offset, 100 * iv.high, "n.s.", ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ticks = [_with_units(k, diffs[k]) for k in labels]
    ax.set_xticks(range(len(labels)), ticks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("points")
    ax.set_title(f"minus {intervals['baseline']} (paired 95% interval)", fontsize=9)
    ax.legend(fontsize=7)


def _seen_mean(row: list[float], i: int) -> float:
    """Mean over the tasks trained by stage ``i`` (the row also holds the next task, for FWT)."""
    return statistics.fmean(row[: i + 1])


def _curves(
    ax,
    groups: dict[str, list[dict]],
    tasks: list[str],
    value: Callable[[list[float], int], float],
    ylabel: str,
    title: str,
    by_stage: bool = False,
) -> None:
    """One line per group: ``value(accuracy row, stage)`` after each stage, averaged over runs (the
    legend says over how many: groups with fewer runs average over fewer orders and seeds)."""
    T = len(tasks)
    for label, runs in groups.items():
        full = [r for r in runs if len(r["accuracy"]) == T]
        if full:
            curve = [statistics.fmean(value(r["accuracy"][i], i) for r in full) for i in range(T)]
            ax.plot(range(1, T + 1), [100 * c for c in curve], "o-", label=_counted(label, len(full), "run"))
        elif value is _seen_mean:  # multi-task: one point, after the whole sequence
            aa = statistics.fmean(r["metrics"]["AA"] for r in runs)
            ax.plot([T], [100 * aa], "*", ms=12, label=_counted(label, len(runs), "run"))
    names = [f"stage {i}" for i in range(1, T + 1)] if by_stage else tasks  # orders differ: by position
    ax.set_xticks(range(1, T + 1), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("after training")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def compare_figure(
    groups: dict[str, list[dict]],
    tasks: list[str],
    path: Path,
    by_stage: bool = False,
    intervals: dict | None = None,
) -> None:
    """Panels written to ``path``: AA/BWT bars, mean accuracy so far, the first task's accuracy, and
    with ``intervals`` (``paired.compare_intervals``) each method's difference from the baseline.

    Args:
        groups: label → complete results of that method (one per seed and order).
        tasks: the task names in training order (of the first run).
        by_stage: the runs follow different orders: the x axis is the stage, the last panel each
            order's own first task.
    """
    plt = pyplot()
    diff = bool(intervals and intervals.get("vs_baseline"))
    fig, axes = plt.subplots(1, 3 + diff, figsize=(15 + 5 * diff, 4.2))
    _bars(axes[0], groups, intervals)
    if diff:
        _differences(axes[3], intervals)
    _curves(
        axes[1],
        groups,
        tasks,
        _seen_mean,
        "mean score on tasks seen so far (%)",
        "Average score along the sequence",
        by_stage,
    )
    first = "each order's first task" if by_stage else f"task 1 '{tasks[0]}'"
    _curves(
        axes[2],
        groups,
        tasks,
        lambda row, i: row[0],
        f"score on {first} (%)",
        "Forgetting of the first task",
        by_stage,
    )
    fig.tight_layout()
    _save(plt, fig, path, dpi=100)


def memory_curve(runs: list[dict], keys: tuple[str, ...]) -> list[float]:
    """Mean over ``runs`` of the sum of ``keys`` (``MEMORY`` fields; absent: 0) after each stage, in bytes."""
    stages = min(len(r["per_task"]) for r in runs)
    return [
        statistics.fmean(sum(r["per_task"][i].get(k) or 0 for k in keys) for r in runs) for i in range(stages)
    ]


def memory_figure(groups: dict[str, list[dict]], path: Path) -> None:
    """Memory against the number of tasks trained, one line per method (mean over its runs), written to
    ``path``: the adapter state it holds (SLAO flat, per-task methods growing with T), and that plus
    the optimizer state and any replay buffer. The multi-task baseline (one stage) is a point at T.

    Args:
        groups: label → complete results of that method (``per_task`` entries; older runs lack the
            optimizer and buffer bytes, counted as 0 there).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    T = max(len(r["tasks"]) for runs in groups.values() for r in runs)
    top = max(max(memory_curve(runs, MEMORY)) for runs in groups.values())
    unit, scale = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    for ax, keys, title in (
        (axes[0], MEMORY[:1], "Adapter state held after each task"),
        (axes[1], MEMORY, "Adapters + AdamW state + replay buffer"),
    ):
        for k, (label, runs) in enumerate(groups.items()):
            curve = [b / scale for b in memory_curve(runs, keys)]
            xs = range(1, len(curve) + 1) if len(curve) > 1 or T == 1 else [T]
            # methods of equal memory draw the same line: a marker and dash of its own keeps each visible
            style = dict(marker="os^Dvx"[k % 6], ls=("-", "--", ":", "-.")[k % 4], ms=9 - k % 4)
            if len(curve) == 1:
                style.update(marker="*", ls="none", ms=12)
            ax.plot(list(xs), curve, label=f"{label} ({curve[-1]:.1f} {unit})", fillstyle="none", **style)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path, dpi=100)

"""One plotter for every op: median ms per provider and case (and peak memory where measured).

Run: ``python -m mbf.bench.plot [bench/results/FILE.json ...]`` (default: every results file).
Writes ``<file>.<op>.png`` beside each results file; each bar is labelled with its ratio
(``ms / ms_of_reference``, larger = slower).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from mbf._optional import pyplot
from mbf.bench.rows import CASE_FIELDS, RESULTS_DIR, WILDCARD_FIELDS, case_label, ratio_label, same_case
from mbf.bench.train_step import MEMORY_KEYS
from mbf.io import atomic_write

__all__ = ["main", "plot_file", "plot_op"]


def _case(row: dict) -> tuple:
    return tuple(row.get(f) for f in CASE_FIELDS)


def _cases(rows: list[dict]) -> list[dict]:
    """One row per case, in order; a row without a wildcard field (the floor: no adapter dtype) joins
    the cases it matches instead of making its own."""
    full = [r for r in rows if all(r.get(f) is not None for f in WILDCARD_FIELDS)]
    reps: dict[tuple, dict] = {}
    for r in rows:
        if r in full or not any(same_case(r, f) for f in full):
            reps.setdefault(_case(r), r)
    return list(reps.values())


def _panel(ax, rows: list[dict], cases: list[dict], providers: list[str], key: str, annotate: bool) -> None:
    """Grouped bars: one group per case, one bar per provider (the last row of a repeated case)."""
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        hits = [[r for r in rows if r["provider"] == provider and same_case(r, c)] for c in cases]
        values = [h[-1].get(key) if h else None for h in hits]
        xs = [i + j * width for i in range(len(cases))]
        bars = ax.bar(xs, [0.0 if v is None else v for v in values], width, label=provider)
        if annotate:
            labels = [ratio_label(h[-1]).split(" ")[0] if h else "" for h in hits]
            ax.bar_label(bars, labels, fontsize=6, rotation=90, padding=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([case_label(c) for c in cases], fontsize=6)
    ax.grid(axis="y", alpha=0.3)


def _bytes_panel(ax, rows: list[dict]) -> None:
    """Stacked bars: what each row's step holds, by kind (``train_step.memory_bytes``), in MiB."""
    bottom = [0.0] * len(rows)
    for key in MEMORY_KEYS:
        values = [r.get(key, 0) / 2**20 for r in rows]
        ax.bar(
            range(len(rows)), values, 0.6, bottom=bottom, label=key.removesuffix("_bytes").replace("_", " ")
        )
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['provider']}\n{r.get('dtype', '')}" for r in rows], fontsize=6)
    ax.set_ylabel("held by one step, by kind (MiB)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_op(rows: list[dict], path: Path) -> Path:
    """The figure of one op's rows, written to ``path``."""
    plt = pyplot()
    cases = _cases(rows)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    memory = [r for r in rows if r.get("peak_mem_bytes") is not None]
    held = [r for r in rows if any(k in r for k in MEMORY_KEYS)]
    panels = 1 + bool(memory) + bool(held)
    fig, axes = plt.subplots(1, panels, figsize=(panels * max(6, 0.9 * len(cases) + 3), 4.8))
    axes = list(axes) if panels > 1 else [axes]
    _panel(axes[0], rows, cases, providers, "ms", annotate=True)
    axes[0].set_yscale("log")
    axes[0].margins(y=0.15)  # room for the ratio labels above the bars
    axes[0].set_ylabel("median ms (lower is better)")
    references = sorted({ratio_label(r).split(" ", 1)[1] for r in rows if ratio_label(r)})
    if references:
        axes[0].set_title(f"bar labels: ms / ms of {', '.join(references)} (larger = slower)", fontsize=8)
    axes[0].legend(fontsize=8)
    if memory:
        scaled = [{**r, "peak_gib": r["peak_mem_bytes"] / 2**30} for r in memory]
        _panel(axes[1], scaled, cases, providers, "peak_gib", annotate=False)
        axes[1].set_ylabel("peak memory (GiB)")
    if held:
        _bytes_panel(axes[-1], held)
    fig.suptitle(f"{rows[0]['op']} — {rows[0]['device']} — {rows[0]['date']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def plot_file(path: Path) -> list[Path]:
    """One PNG per op beside a results file: ``<file>.<op>.png``."""
    path = Path(path)
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in json.loads(path.read_text()):
        by_op[r["op"]].append(r)
    return [plot_op(op_rows, path.with_suffix(f".{op}.png")) for op, op_rows in by_op.items()]


def main(argv: list[str] | None = None) -> int:
    files = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or sorted(RESULTS_DIR.glob("*.json"))
    for f in files:
        for png in plot_file(f):
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

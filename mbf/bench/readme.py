"""The README's performance section, generated from every committed ``bench/results/*.json``.

Run: ``python -m mbf.bench.readme [README.md]`` (rewrites the file between the perf markers). One
table per op and results file, headed by its device and date; numbers are never typed by hand.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from mbf.bench.rows import RESULTS_DIR
from mbf.io import atomic_write_text

__all__ = ["END", "START", "main", "render", "table_for", "update_readme"]

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
_COLUMNS = ("provider", "mode", "shape", "M", "r", "dtype", "median ms", "TFLOP/s", "× floor", "× baseline")
_HEADER = "| " + " | ".join((*_COLUMNS, "peak MiB", "extra")) + " |\n" + "|---" * (len(_COLUMNS) + 2) + "|"


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _dropout(r: dict) -> str:
    return f", LoRA dropout {r['dropout']:g}" if r.get("dropout") else ""


def _line(r: dict) -> str:
    peak = r.get("peak_mem_bytes")
    extra = ", ".join(
        f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
        for k in r.get("extra_keys", [])
        if k in r
    )
    baseline = "" if r.get("ratio_to_baseline") is None else f"{r['ratio_to_baseline']:.3f} × {r['baseline']}"
    return (
        f"| {r['provider']} | {r.get('mode', '')} | {r.get('shape', '')}{_dropout(r)} | {r.get('M', '')} | "
        f"{r.get('r', '')} | {r.get('dtype', '')} | {_fmt(r.get('ms'), '.3f')} | "
        f"{_fmt(r.get('tflops'), '.3f')} | {_fmt(r.get('ratio_to_floor'), '.3f')} | {baseline} | "
        f"{'' if peak is None else format(peak / 2**20, '.1f')} | {extra} |"
    )


def table_for(rows: list[dict]) -> str:
    """One markdown table per op, in the order the ops were measured."""
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    return "\n".join(
        f"**{op}**\n\n{_HEADER}\n" + "\n".join(_line(r) for r in op_rows) + "\n"
        for op, op_rows in by_op.items()
    )


def render(results_dir: Path = RESULTS_DIR) -> str:
    """The tables of every results file in ``results_dir``, in file-name order (a JSON file that is not a
    list of rows, such as the compile check's report, is not a results file)."""
    files = sorted(Path(results_dir).glob("*.json"))
    out = []
    for f in files:
        rows = json.loads(f.read_text())
        if isinstance(rows, list) and rows:
            out.append(f"#### {rows[0]['device']} — {rows[0]['date']} (`bench/results/{f.name}`)\n")
            out.append(table_for(rows))
    return "\n".join(out) if out else "No benchmark results are committed yet.\n"


def update_readme(readme: Path, results_dir: Path = RESULTS_DIR) -> None:
    """Replace what stands between the perf markers of ``readme`` (atomically).

    Raises:
        ValueError: when the markers are missing.
    """
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: perf markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(f"{head}{START}\n{render(results_dir)}\n{END}{tail}", readme)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = Path(argv[0]) if argv else RESULTS_DIR.parents[1] / "README.md"
    try:
        update_readme(readme)
    except (ValueError, FileNotFoundError) as e:
        print(f"mbf.bench.readme: {e}", file=sys.stderr)
        return 1
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

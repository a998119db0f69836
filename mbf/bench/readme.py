"""The tables of docs/performance.md, generated from every committed ``bench/results/*.json``.

Run: ``python -m mbf.bench.readme [PAGE]`` (rewrites PAGE, by default ``docs/performance.md``, between the
perf markers; the README links to it). One table per op and results file, headed by its device and date;
numbers are never typed by hand.
After a GPU run: ``python -m mbf.bench.readme --import <the files bench/run_gpu.sh returned>`` takes
the results in (plots included) first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from mbf.bench.rows import RESULTS_DIR
from mbf.io import atomic_write_text

__all__ = ["END", "PAGE", "START", "import_run", "is_results", "main", "render", "table_for", "update_readme"]

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
PAGE = RESULTS_DIR.parents[1] / "docs" / "performance.md"  # the page that holds the markers
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


def _breakdown(rows: list[dict]) -> str:
    """Per-kernel ms of each provider's fwd+bwd (``mbf.bench.launches``), its share of the total."""
    lines = ["| provider | shape | M | r | adapters | kernel | ms | share | launches |", "|---" * 9 + "|"]
    for r in rows:
        for name, k in r["kernels"].items():
            share = k["ms"] / r["ms"] if r["ms"] else 0.0
            lines.append(
                f"| {r['provider']} | {r['shape']} | {r['M']} | {r['r']} | {r.get('adapter_dtype', '')} | "
                f"`{name}` | {k['ms']:.3f} | {share:.0%} | {k['launches']:g} |"
            )
    return "\n".join(lines)


def table_for(rows: list[dict]) -> str:
    """One markdown table per op, in the order the ops were measured."""
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    return "\n".join(
        f"**{op}**\n\n"
        + (
            _breakdown(op_rows)
            if op == "kernel_breakdown"
            else _HEADER + "\n" + "\n".join(map(_line, op_rows))
        )
        + "\n"
        for op, op_rows in by_op.items()
    )


def is_results(data) -> bool:
    """Whether parsed JSON is a results file: a list of rows (not a report, timeline or environment)."""
    return isinstance(data, list) and bool(data) and all(isinstance(r, dict) and "op" in r for r in data)


def render(results_dir: Path = RESULTS_DIR) -> str:
    """The tables of every results file in ``results_dir``, in file-name order (a JSON file that is not a
    list of rows, such as the compile check's report, is not a results file)."""
    files = sorted(Path(results_dir).glob("*.json"))
    out = []
    for f in files:
        rows = json.loads(f.read_text())
        if is_results(rows):
            out.append(f"#### {rows[0]['device']} — {rows[0]['date']} (`bench/results/{f.name}`)\n")
            out.append(table_for(rows))
    return "\n".join(out) if out else "No benchmark results are committed yet.\n"


def update_readme(readme: Path, results_dir: Path = RESULTS_DIR) -> None:
    """Replace what stands between the perf markers of the page ``readme`` (atomically).

    Raises:
        ValueError: when the markers are missing.
    """
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: perf markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(f"{head}{START}\n{render(results_dir)}\n{END}{tail}", readme)


def import_run(folder: Path, results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Take in what a GPU run returned (``bench/run_gpu.sh``'s ``$OUT``): each results file goes to
    ``results_dir`` (its rows replacing a file of the same name), everything else (run.log,
    environment, timeline, JUnit XML) to ``results_dir/gpu-runs/<results file's stem>/``; then a plot
    per op beside each results file.

    Raises:
        FileNotFoundError: when ``folder`` holds no results file.
    """
    from mbf.bench.plot import plot_file

    files = sorted(Path(folder).iterdir())
    results = [f for f in files if f.suffix == ".json" and is_results(json.loads(f.read_text()))]
    if not results:
        raise FileNotFoundError(f"{folder}: no results file (a JSON list of rows) to import")
    for f in files:
        if f.is_file() and f not in results:
            dest = results_dir / "gpu-runs" / results[0].stem / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    imported = [Path(shutil.copyfile(f, results_dir / f.name)) for f in results]
    for f in imported:
        for png in plot_file(f):
            print(f"plot: {png}")
    return imported


def main(argv: list[str] | None = None) -> int:
    """``python -m mbf.bench.readme [PAGE] [--import FOLDER]``."""
    parser = argparse.ArgumentParser(prog="python -m mbf.bench.readme", description=__doc__.splitlines()[0])
    parser.add_argument("readme", nargs="?", type=Path, default=PAGE, metavar="PAGE",
                        help="the page whose perf markers it rewrites (docs/performance.md)")  # fmt: skip
    parser.add_argument("--import", dest="folder", type=Path, default=None,
                        help="first take in a GPU run's files (run_gpu.sh's $OUT)")  # fmt: skip
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.folder is not None:
            for f in import_run(args.folder):
                print(f"imported {f}")
        update_readme(args.readme)
    except (ValueError, FileNotFoundError) as e:
        print(f"mbf.bench.readme: {e}", file=sys.stderr)
        return 1
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

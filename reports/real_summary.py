"""Seed-by-seed tables of a sweep's runs, for the analysis (reports/REAL.md): every number printed is
read from the runs' results.json, none is typed by hand.

    python reports/real_summary.py reports/real/run          # the std1 runs (long1-* left out)
    python reports/real_summary.py reports/real/run long1-   # the long-order runs
"""

from __future__ import annotations

import sys
from pathlib import Path

from mbf.experiment import results as results_file
from mbf.experiment.metrics import mean_std, pct

ORDER = ("seq-lora", "slao", "ftba-mb", "ftba-mba", "frea-mb", "ftba-ma", "freb-ma", "slao-random",
         "multi-task")  # fmt: skip


def _pm(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m, s = mean_std(xs)
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len(xs) > 1 else pct(m)


def main(folder: str, prefix: str = "") -> None:
    runs = []
    for d in sorted(Path(folder).iterdir()):
        wanted = d.name.startswith(prefix) if prefix else not d.name.startswith("long")
        if wanted and (d / "results.json").is_file():
            r = results_file.read(d)
            if r["complete"]:
                runs.append(r)
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    tasks = runs[0]["tasks"]
    print(f"| method | seeds | AA | BWT | FWT | AA per seed | final score {' / '.join(tasks)} |")
    print("|---|---|---|---|---|---|---|")
    for method in sorted(by, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        rs = sorted(by[method], key=lambda r: r["seed"])
        final = " / ".join(pct(sum(r["accuracy"][-1][j] for r in rs) / len(rs)) for j in range(len(tasks)))
        seeds = ", ".join(str(r["seed"]) for r in rs)
        print(
            f"| {method} | {seeds} | {_pm([r['metrics']['AA'] for r in rs])} | "
            f"{_pm([r['metrics']['BWT'] for r in rs])} | {_pm([r['metrics'].get('FWT') for r in rs])} | "
            f"{' / '.join(pct(r['metrics']['AA']) for r in rs)} | {final} |"
        )


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]))

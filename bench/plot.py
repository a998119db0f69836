"""Draw every results file's kernel-level rows: one PNG per op, median ms per provider and case.

Run: ``python bench/plot.py [bench/results/FILE.json ...]`` (default: every file). Writes
``<file>.<op>.png`` beside each results file. Train-step rows are drawn by ``mbf.benchmark``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plot_file(path: Path) -> list[Path]:
    rows = json.loads(path.read_text())
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["op"] != "train_step":
            by_op[r["op"]].append(r)
    written = []
    for op, op_rows in by_op.items():
        cases = list(dict.fromkeys((r.get("shape"), r.get("M"), r.get("r"), r.get("mode")) for r in op_rows))
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 3), 4.5))
        width = 0.8 / len(providers)
        for j, p in enumerate(providers):
            vals = []
            for case in cases:
                key = lambda r: (r.get("shape"), r.get("M"), r.get("r"), r.get("mode"))  # noqa: E731
                hit = [r for r in op_rows if r["provider"] == p and key(r) == case]
                vals.append(hit[-1]["ms"] if hit else 0.0)
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{s}\nM={m} r={r}\n{mode}" for s, m, r, mode in cases], fontsize=6, rotation=0)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{op} — {op_rows[0]['device']} — {op_rows[0]['date']}", fontsize=9)
        fig.tight_layout()
        out = path.with_suffix(f".{op}.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(RESULTS.glob("*.json"))
    for f in files:
        for png in plot_file(f):
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

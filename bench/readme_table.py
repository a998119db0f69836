"""Regenerate the README's performance section from every committed ``bench/results/*.json``.

Run: ``python bench/readme_table.py`` (rewrites README.md between the perf markers). One table per
results file, headed by its device and date; numbers are never typed by hand.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table_for(rows: list[dict]) -> str:
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    parts = []
    for op, op_rows in by_op.items():
        parts.append(f"**{op}**\n")
        parts.append(
            "| provider | mode | shape | M | r | dtype | median ms | TFLOP/s | × floor | peak MiB | extra |"
        )
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in op_rows:
            peak = r.get("peak_mem_bytes")
            extra = ", ".join(
                f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                for k in r.get("extra_keys", [])
                if k in r
            )
            parts.append(
                f"| {r['provider']} | {r.get('mode', '')} | {r.get('shape', '')} | {r.get('M', '')} | "
                f"{r.get('r', '')} | {r.get('dtype', '')} | {_fmt(r.get('ms'), '.3f')} | "
                f"{_fmt(r.get('tflops'), '.3f')} | {_fmt(r.get('ratio_to_floor'), '.3f')} | "
                f"{'' if peak is None else format(peak / 2**20, '.1f')} | {extra} |"
            )
        parts.append("")
    return "\n".join(parts)


def render(results_dir: Path = ROOT / "bench" / "results") -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return "No benchmark results are committed yet.\n"
    out = []
    for f in files:
        rows = json.loads(f.read_text())
        if not rows:
            continue
        device, date = rows[0]["device"], rows[0]["date"]
        out.append(f"#### {device} — {date} (`bench/results/{f.name}`)\n")
        out.append(table_for(rows))
    return "\n".join(out)


def main(readme: Path = ROOT / "README.md") -> int:
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme}: perf markers {START} / {END} not found", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

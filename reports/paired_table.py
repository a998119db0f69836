"""A table of paired intervals, generated from ``mbf compare``'s compare.json: each method's AA, BWT,
FWT and LA with its 95 % interval, then each method minus the baseline, marked "n.s." where the interval
crosses 0. Points, one decimal. The README's results table and those of docs/results.md are made by it,
each with its command written beside it, e.g.

    python reports/paired_table.py reports/paired/compare \\
        --extra reports/paired/compare-vs-ftba-mb slao ftba-mba \\
        --extra reports/paired/compare-vs-slao slao-random slao-inverse slao-constant --readme docs/results.md

``--memory`` adds a column: each method's adapter state after its runs' last task (KiB; its span when the
runs differ, e.g. InfLoRA's kept bases follow the data), plus replay's buffer of kept examples.
``--state`` adds the whole state instead: adapter + AdamW moments + replay buffer after the last task (KiB),
what a constant-memory claim is about. ``--diffs METHOD ...`` keeps only those methods' differences
against the main comparison's baseline; ``--methods METHOD ...`` keeps only those methods' own rows (a short
table for the README, the whole one in docs/results.md).
``--extra DIR [METHOD ...]`` adds the differences of another comparison (another baseline, e.g. SLAO
against FTBA-MB: the orthogonal init isolated), only for the METHODs named after it (every method when
none is); repeat it for each comparison. ``--readme FILE`` (README.md or a docs/ page) replaces the
text between ``<!-- paired:start -->`` and ``<!-- paired:end -->`` in FILE (``--marker NAME``:
``<!-- NAME:start -->``, for a second table in the same file); without it the table is
printed. A unit is an (order, seed) pair; its label comes from the run directory's name,
``ORDER-METHOD-sSEED`` as reports/sweeps/paired.toml names them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

METRICS = ("AA", "BWT", "FWT", "LA")
MEMORY = "adapter KiB after T tasks"
STATE = "state KiB after T tasks"


def markers(name: str = "paired") -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _units(runs: list[str]) -> set[tuple[str, int]]:
    """The (order, seed) units of run directories named ORDER-METHOD-sSEED."""
    out = set()
    for r in runs:
        m = re.fullmatch(r"([^-]+)-.+-s(\d+)", Path(r).name)
        if m is None:
            raise ValueError(f"{r}: not named ORDER-METHOD-sSEED, so its unit is unknown")
        out.add((m[1], int(m[2])))
    return out


def units_label(units: set[tuple[str, int]]) -> str:
    """``6 (std1 0–2; std2 0–1; std3 0)``: the count, then each order's seeds (runs of seeds joined)."""
    parts = []
    for order in sorted({o for o, _ in units}):
        seeds = sorted(s for o, s in units if o == order)
        spans, start, prev = [], seeds[0], seeds[0]
        for s in seeds[1:] + [None]:
            if s is not None and s == prev + 1:
                prev = s
                continue
            spans.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = prev = s
        parts.append(f"{order} {', '.join(spans)}")
    return f"{len(units)} ({'; '.join(parts)})"


def _checked(units: set, row: dict, what: str) -> set:
    """``units`` when the interval was computed over as many (compare pairs runs on their data too)."""
    if len(units) != row["units"]:
        raise ValueError(f"{what}: the interval is over {row['units']} units, run names give {len(units)}")
    return units


def _cell(iv: dict | None, *, diff: bool) -> str:
    if iv is None:
        return "–"
    f = (lambda x: f"{100 * x:+.1f}") if diff else (lambda x: f"{100 * x:.1f}")
    text = f"{f(iv['estimate'])} [{f(iv['low'])}, {f(iv['high'])}]".replace("-", "−")
    if diff and not iv["significant"]:
        text += " n.s."
    return f"**{text}**" if diff and iv["significant"] else text


def _plain(label: str) -> str:
    """A method as the runs call it: "o-lora" for "o-lora [lr=0.001]", the label mbf compare gives where the
    runs' settings differ (``--methods`` and ``--extra`` name methods either way)."""
    return label.split(" [")[0]


def _kib(values: list[int]) -> str:
    low, high = min(values) / 1024, max(values) / 1024
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"


def memory_cell(method: dict) -> str:
    """A method's adapter state after each run's last task (KiB), and replay's buffer beside it."""
    mem = method.get("memory")
    if not mem or not mem.get("adapter_bytes"):
        return "–"
    text = _kib([per_task[-1] for per_task in mem["adapter_bytes"]])
    buffers = [per_task[-1] for per_task in mem.get("buffer_bytes") or [] if per_task[-1] is not None]
    return f"{text} + {_kib(buffers)} buffer" if buffers else text


def state_cell(method: dict) -> str:
    """A method's whole state after each run's last task (KiB): adapter + optimizer + buffer bytes, over the
    runs that recorded their optimizer's bytes (older runs did not)."""
    mem = method.get("memory") or {}
    runs = zip(mem.get("adapter_bytes") or [], mem.get("optimizer_bytes") or [],
               mem.get("buffer_bytes") or [[None]] * len(mem.get("adapter_bytes") or []))  # fmt: skip
    totals = [a[-1] + o[-1] + (b[-1] or 0) for a, o, b in runs if a[-1] is not None and o[-1] is not None]
    return _kib(totals) if totals else "–"


def table(
    compare: dict,
    extras: list[tuple[dict, set[str] | None]] = (),
    *,
    memory: bool = False,
    state: bool = False,
    diffs_of: set[str] | None = None,
    methods: set[str] | None = None,
) -> str:
    """The markdown table of one comparison (and the differences of ``extras``); ``memory``: with the
    adapter state each method holds after the last task; ``state``: with its whole state (adapter,
    optimizer, buffer); ``diffs_of``: only these methods' differences against the main baseline; ``methods``:
    only these methods' own rows (named as the runs call them, like ``diffs_of``)."""
    iv, runs = compare["intervals"], compare["methods"]
    base = iv.get("baseline")
    extra = [STATE] if state else [MEMORY] if memory else []
    head = [*METRICS, *extra]
    lines = [f"| | units | {' | '.join(head)} |", "|---" * (len(head) + 2) + "|"]
    tail = " | –" if extra else ""  # (a difference has no memory of its own)
    unknown = (methods or set()) - set(iv["methods"]) - {_plain(m) for m in iv["methods"]}
    if unknown:
        raise ValueError(f"--methods: no row for {sorted(unknown)} (has: {sorted(iv['methods'])})")
    for m, row in iv["methods"].items():
        if methods is not None and not {m, _plain(m)} & methods:
            continue
        label = units_label(_checked(_units(runs[m]["runs"]), row, m))
        cells = [_cell(row[k], diff=False) for k in METRICS]
        cells += [state_cell(runs[m])] if state else [memory_cell(runs[m])] if memory else []
        lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")

    def diffs(cmp: dict, only: set[str] | None) -> None:
        civ, cruns = cmp["intervals"], cmp["methods"]
        rows = civ.get("vs_baseline") or {}
        named = {m: _plain(m) for m in rows}
        unknown = (only or set()) - set(named) - set(named.values())
        if unknown:
            raise ValueError(f"--extra: no difference for {sorted(unknown)} (has: {sorted(named)})")
        for m, row in rows.items():
            if (only is not None and not {m, named[m]} & only) or all(row[k] is None for k in METRICS[1:]):
                continue  # (multi-task has only AA: no difference worth a row)
            units = _checked(_units(cruns[m]["runs"]) & _units(cruns[civ["baseline"]]["runs"]), row, m)
            cells = " | ".join(_cell(row[k], diff=True) for k in METRICS)
            lines.append(f"| {m} − {civ['baseline']} | {units_label(units)} | {cells}{tail} |")

    if base:
        diffs(compare, diffs_of)
    for cmp, only in extras:
        diffs(cmp, only)
    return "\n".join(lines)


def replace_between(text: str, body: str, path: str = "README", marker: str = "paired") -> str:
    start, end = markers(marker)
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: needs one {start} before one {end}")
    head, rest = text.split(start)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def _load(d: str) -> dict:
    p = Path(d)
    return json.loads((p / "compare.json" if p.is_dir() else p).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compare", help="a compare directory (or its compare.json)")
    ap.add_argument(
        "--extra",
        nargs="+",
        action="append",
        default=[],
        metavar=("DIR", "METHOD"),
        help="another comparison's differences, only the METHODs' rows when named (repeatable)",
    )
    ap.add_argument("--memory", action="store_true", help=f"add a column: {MEMORY} (KiB)")
    ap.add_argument("--state", action="store_true", help=f"add a column: {STATE} (all of it)")
    ap.add_argument("--diffs", nargs="+", metavar="METHOD", help="only their differences (main baseline)")
    ap.add_argument("--methods", nargs="+", metavar="METHOD", help="only their own rows")
    ap.add_argument("--readme", metavar="FILE",
                    help="write the table between the markers of FILE (README.md, a docs/ page)")  # fmt: skip
    ap.add_argument("--marker", default="paired", help="the markers' name: <!-- NAME:start --> (paired)")
    a = ap.parse_args(argv)
    extras = [(_load(d), set(only) or None) for d, *only in a.extra]
    only = set(a.diffs or ()) or None
    rows = set(a.methods or ()) or None
    body = table(_load(a.compare), extras, memory=a.memory, state=a.state, diffs_of=only, methods=rows)
    if a.readme:
        p = Path(a.readme)
        p.write_text(replace_between(p.read_text(), body, a.readme, a.marker))
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Each method's learning rate: the one of highest AA on held-out training examples among the runs of
``reports/sweep_methods.sh lr`` (issue 22 item 6).

    python reports/pick_lr.py reports/methods/lr

Reads every complete run under DIR/run/ (each must be scored on the validation split), writes
DIR/choice.md (the grid and every run's held-out AA) and DIR/chosen.txt ("method lr" per line, what
``reports/sweep_methods.sh compare`` reads). A tie keeps the smaller rate. Incomplete runs are listed,
not chosen from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mbf.experiment import results as results_file


def main(root: Path) -> None:
    runs, cut = {}, []
    for d in sorted((root / "run").glob("*/")):
        res = results_file.read(d)
        if res.get("eval_split") != "validation":
            sys.exit(f"{d}: scored on the test split, not held-out examples: not a learning-rate run")
        if not res["complete"]:
            cut.append(d.name)
            continue
        runs.setdefault(res["method"], {})[res["train"]["lr"]] = res["metrics"]["AA"]
    if not runs:
        sys.exit(f"{root}/run: no complete run")
    grid = sorted({lr for by_lr in runs.values() for lr in by_lr})
    lines = [
        "# Learning rate per method, chosen on held-out training examples",
        "",
        "AA (%) on held-out training examples (`--eval-split validation`), std1, seed 0; **bold**: chosen.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
        "|---" * (len(grid) + 1) + "|",
    ]
    chosen = {}
    for method, by_lr in runs.items():
        best = max(sorted(by_lr), key=lambda lr: by_lr[lr])  # max keeps the first (smallest) of a tie
        chosen[method] = best
        cells = [f"**{100 * by_lr[lr]:.1f}**" if lr == best else
                 (f"{100 * by_lr[lr]:.1f}" if lr in by_lr else "") for lr in grid]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if cut:
        lines += ["", f"Not complete (not chosen from): {', '.join(cut)}"]
    (root / "choice.md").write_text("\n".join(lines) + "\n")
    (root / "chosen.txt").write_text("".join(f"{m} {lr:g}\n" for m, lr in chosen.items()))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))

"""Each method's learning rate: the one of highest AA on held-out training examples among the runs of
the ``lr`` stage of ``reports/sweeps/methods.toml`` (issue 22 item 6; that stage runs this afterwards).

    python reports/pick_lr.py reports/methods/lr

Reads every run under DIR/run/ (each must be scored on the validation split, and all must share their
settings but the method and the learning rate), writes DIR/choice.md (the grid and every run's held-out
AA) and DIR/chosen.txt ("method lr" per line, the ``compare`` stage's ``per_method`` rates). A tie
keeps the smaller rate; choice.md names the methods whose rate is the grid's smallest or largest.
chosen.txt is written only when every method's run at every rate of the grid (the rates of all runs) is
complete; otherwise choice.md lists what is missing and the script exits with status 1, so that a cut
sweep never hands ``compare`` a rate the grid has not settled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mbf.experiment import results as results_file


def _setting(res: dict) -> tuple:
    """What every run of the sweep must share: all of a run's settings but the method and its rate."""
    train = {k: v for k, v in res["train"].items() if k != "lr"}
    return (res.get("data_fingerprint"), repr(sorted(train.items())), repr(res["lora"]), res.get("n_train"),
            res.get("n_test"), res.get("suite"), res.get("order"), res.get("model"))  # fmt: skip


def main(root: Path) -> int:
    (root / "chosen.txt").unlink(missing_ok=True)  # never a stale choice beside a new choice.md
    runs, cut, settings, grid = {}, [], {}, set()
    for d in sorted((root / "run").glob("*/")):
        if not (d / "results.json").is_file():
            cut.append(f"{d.name} (no task finished yet)")
            continue
        res = results_file.read(d)
        if results_file.eval_split(res) != "validation":
            sys.exit(f"{d}: scored on the test split, not held-out examples: not a learning-rate run")
        settings.setdefault(_setting(res), []).append(d.name)
        grid.add(res["train"]["lr"])
        if not res["complete"]:
            cut.append(d.name)
            continue
        runs.setdefault(res["method"], {})[res["train"]["lr"]] = res["metrics"]["AA"]
    if len(settings) > 1:
        groups = "; ".join(", ".join(names) for names in settings.values())
        sys.exit(f"{root}/run: the runs differ in more than the method and learning rate ({groups}): one "
                 "sweep's runs only")  # fmt: skip
    if not runs:
        sys.exit(f"{root}/run: no complete run")
    grid = sorted(grid)
    lines = [
        "# Learning rate per method, chosen on held-out training examples",
        "",
        "AA (%) on held-out training examples (`--eval-split validation`), std1, seed 0; **bold**: chosen.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
        "|---" * (len(grid) + 1) + "|",
    ]
    chosen, unsettled = {}, []
    for method, by_lr in runs.items():
        best = max(sorted(by_lr), key=lambda lr: by_lr[lr])  # max keeps the first (smallest) of a tie
        if set(by_lr) == set(grid):
            chosen[method] = best
        else:
            unsettled.append(method)
        cells = [f"**{100 * by_lr[lr]:.1f}**" if lr == best and method in chosen else
                 (f"{100 * by_lr[lr]:.1f}" if lr in by_lr else "–") for lr in grid]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    edge = [f"{m} ({lr:g})" for m, lr in chosen.items() if len(grid) > 1 and lr in (grid[0], grid[-1])]
    if edge:
        lines += ["", f"At the grid's edge (a rate beyond it was not tried, and might score higher): "
                      f"{', '.join(edge)}"]  # fmt: skip
    if cut:
        lines += ["", f"Not complete: {', '.join(cut)}"]
    if unsettled:
        lines += ["", f"A rate of the grid has no complete run: {', '.join(unsettled)}"]
    if cut or unsettled:
        lines += ["", "**No rate chosen** (chosen.txt not written): the sweep is not finished."]
    (root / "choice.md").write_text("\n".join(lines) + "\n")
    if not (cut or unsettled):
        (root / "chosen.txt").write_text("".join(f"{m} {lr:g}\n" for m, lr in chosen.items()))
    print("\n".join(lines))
    return 1 if cut or unsettled else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))

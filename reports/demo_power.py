"""How many test examples per task a paired comparison needs for its AA difference to leave its 95 %
interval (issue 21 item 7: the demo's size), from two committed runs' per-example predictions.

    python reports/demo_power.py reports/paired/run/std1-slao-s0 reports/paired/run/std1-seq-lora-s0

AA's difference is the mean over tasks of each task's mean per-example difference of the final row
(``d = correct_a - correct_b`` on the same test examples), so with n examples per task its standard
error is ``sqrt(sum_t var(d_t) / T^2 / n)`` (normal approximation of the paired bootstrap that
``mbf compare`` draws). The observed difference leaves the interval when ``1.96 SE < |AA diff|``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mbf.experiment import predictions
from mbf.experiment import results as results_file


def final_row(run: Path, scorer: str = "generate") -> dict[str, np.ndarray]:
    loaded = predictions.load_run(run, results_file.read(run), scorer)
    if loaded is None:
        sys.exit(f"{run}: no saved predictions")
    return {t: np.asarray(v["final"], dtype=np.float64) for t, v in loaded.items()}


def main(a: str, b: str) -> None:
    fa, fb = final_row(Path(a)), final_row(Path(b))
    T, total, diffs = len(fa), 0.0, []
    print(f"{a} - {b}, final row, per task: n, mean difference, variance of the per-example difference")
    for t in fa:
        d = fa[t] - fb[t]
        total += d.var(ddof=1)
        diffs.append(d.mean())
        print(f"  {t}: n {len(d)}, {100 * d.mean():+.1f} points, var {d.var(ddof=1):.3f}")
    aa = float(np.mean(diffs))
    print(f"AA difference {100 * aa:+.2f} points")
    for n in (20, 50, 100, 200, 400):
        print(f"  n {n:>3} per task: 95% half-width {100 * 1.96 * np.sqrt(total / T**2 / n):.1f} points")
    need = 1.96**2 * total / T**2 / aa**2
    print(f"n per task for the interval to exclude 0 at this difference: {need:.0f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

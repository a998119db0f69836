"""How much of the past tasks' input energy a sketch-merge run's sketch still holds: per distinct layer input,
Σe / τ (the top-k eigenvalues kept over the total energy of every input seen), from the checkpoint each
run's results.json names, read and checked by ``mbf.checkpoint.read_checkpoint`` (issue 42: what the fixed
budget drops after T tasks).

    python reports/sketch_coverage.py reports/methods/run/long1-sketch-merge-s*/

Prints one line per run: the task the checkpoint closed, k, and the share's min / median / max over the
distinct inputs (q_proj and v_proj share theirs; the checkpoint stores it once), and the layer of the min.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from mbf.checkpoint import read_checkpoint
from mbf.io import read_json_object


def coverage(run: Path) -> tuple[str, int, dict[str, float]]:
    name = read_json_object(run / "results.json").get("checkpoint")
    if not isinstance(name, str) or not (run / name).is_dir():
        raise SystemExit(f"{run}/results.json: checkpoint={name!r}: no checkpoint folder kept there")
    t = read_checkpoint(run / name, strategy="sketch-merge").tensors
    share, k = {}, 0
    for key in sorted(t):
        if key.endswith(".energy"):
            base = key.removesuffix(".energy")
            e, tau = t[key].double(), float(t[f"{base}.total"][0])
            share[base], k = float(e.sum()) / tau, max(k, e.numel())
    if not share:
        raise SystemExit(f"{run / name}: no sketch (.energy/.total tensors) yet: saved before any task ended")
    return Path(name).name, k, share


def main(runs: list[str]) -> int:
    for r in runs:
        task, k, share = coverage(Path(r))
        v = list(share.values())
        low = min(share, key=share.get)
        print(f"{Path(r).name}: after {task}, k {k}, {len(v)} distinct inputs: sketch holds "
              f"{100 * min(v):.1f} / {100 * statistics.median(v):.1f} / {100 * max(v):.1f} % "
              f"(min / median / max) of the inputs' energy; lowest {low}")  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))

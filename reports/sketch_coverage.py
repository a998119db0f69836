"""How much of the past tasks' input energy a sketch-merge run's sketch still holds: per distinct layer input,
Σe / τ (the top-k eigenvalues kept over the total energy of every input seen), from the newest checkpoint of
each run (issue 42: what the fixed budget drops after T tasks).

    python reports/sketch_coverage.py reports/methods/run/long1-sketch-merge-s*/

Prints one line per run: the task the checkpoint closed, k, and the share's min / median / max over the
distinct inputs (q_proj and v_proj share theirs; the checkpoint stores it once), and the layer of the min.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from safetensors.torch import load_file


def coverage(run: Path) -> tuple[str, int, dict[str, float]]:
    ckpts = sorted((run / "checkpoints").glob("task-*/"))
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoint (checkpoints/task-*/)")
    files = list(ckpts[-1].glob("adapters-*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{ckpts[-1]}: expected one adapters-*.safetensors, found {len(files)}")
    t = load_file(files[0])
    share, k = {}, 0
    for key in sorted(t):
        if key.endswith(".energy"):
            base = key.removesuffix(".energy")
            e, tau = t[key].double(), float(t[f"{base}.total"][0])
            share[base], k = float(e.sum()) / tau, max(k, e.numel())
    if not share:
        raise SystemExit(f"{files[0]}: no sketch (.energy/.total tensors): not a sketch-merge run")
    return ckpts[-1].name, k, share


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

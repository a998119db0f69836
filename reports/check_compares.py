"""Regenerate every committed comparison whose runs keep their per-example predictions, each with the
command its sweep runs (the ``[[stages.compare]]`` of reports/sweeps/paired.toml, methods.toml and
memory.toml, and ``mbf demo --suite domains``'s), into a scratch folder, and check that its compare.md and
compare.json are the committed files byte for byte (the plots are not compared: matplotlib's output varies
with its version). Its use: the committed runs' predictions are stored packed (reports/pack_predictions.py);
this shows that the committed tables still follow from what is committed.

    python reports/check_compares.py [SCRATCH]     (default: a new temporary folder)

Exit status 1 when a comparison failed or differs.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mbf.experiment.sweep import compare_argv, load

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("paired", "methods", "memory")
DEMO = Path("reports/demo-domains")


def comparisons() -> list[tuple[Path, list[str]]]:
    """(committed folder, ``mbf compare`` arguments less ``--out``) of every committed comparison checked."""
    found = []
    for name in SWEEPS:
        cfg = load(Path("reports/sweeps") / f"{name}.toml")
        for stage in cfg["stages"]:
            base = Path(cfg["out"]) / stage.get("out", ".")
            for cmp in stage.get("compare", []):
                argv, _ = compare_argv(cmp, base)
                if not argv:
                    raise SystemExit(f"{name}.toml: no run matches {base / cmp['runs']}")
                found.append((Path(argv[-1]), argv[:-2]))
    demo = [str(DEMO / m) for m in ("slao", "seq-lora", "multi-task")]
    found.append((DEMO / "compare", ["compare", *demo]))
    return found


def main(scratch: Path) -> int:
    failed = 0
    for committed, argv in comparisons():
        out = scratch / committed
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out}.log", "w") as log:
            rc = subprocess.run([sys.executable, "-m", "mbf.cli", *argv, "--out", str(out)], stdout=log,
                                stderr=subprocess.STDOUT).returncode  # fmt: skip
        if rc != 0:
            print(f"FAILED  {committed} (mbf compare: {out}.log)")
            failed = 1
            continue
        for f in ("compare.md", "compare.json"):
            same = filecmp.cmp(out / f, committed / f, shallow=False)
            print(f"{'same   ' if same else 'DIFFERS'} {committed / f}", flush=True)
            failed |= not same
    return failed


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())))

"""Pack finished runs' per-example predictions into one file per run (``OUT/predictions.json.gz``), the form
the committed sweep runs are kept in: the checkout's weight (issue 40), 60 MB of ``predictions/*.json``.

    python reports/pack_predictions.py [--remove] RUN_DIR_OR_FOLDER ...

Each argument is a run directory (holding results.json) or a folder searched for them (``reports``). A run
is packed only when complete, after its files are checked as ``mbf compare`` checks them (checksum,
identity, scores against results.json); the pack is read back and must give the files' records (less
``option_scores``, which no table reads). ``--remove`` then deletes the files (in a git checkout: ``git rm``
them instead, after ``python reports/check_compares.py`` shows the committed comparisons unchanged).
Idempotent: packing again writes the same bytes; a run already packed (no files left) is checked only.
``mbf compare``, ``mbf report`` and ``predictions.load_run`` read either form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbf.experiment import predictions


def _runs(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            found.append(p)
        else:
            found += sorted(r.parent for r in p.rglob("results.json"))
    return [r for r in found if (r / predictions.FOLDER).is_dir() or (r / predictions.PACK).is_file()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories, or folders searched for them")
    ap.add_argument("--remove", action="store_true", help="delete each run's predictions/ files once packed")
    args = ap.parse_args(argv)
    runs, refused = _runs(args.paths), 0
    for run in runs:
        try:
            path = predictions.pack(run, remove=args.remove)
        except (ValueError, OSError) as err:
            print(f"not packed: {err}", file=sys.stderr)
            refused += 1
            continue
        print(f"{path} ({path.stat().st_size} bytes)")
    print(f"{len(runs) - refused} of {len(runs)} run(s) packed", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())

"""Reuse a finished run of another sweep instead of running it again, when its settings are the ones asked.

    python reports/reuse_run.py SRC DST [--like REF] KEY=VALUE ...

SRC is a run directory (``mbf continual --out``); DST the directory the sweep would write the same run
to. Each KEY is a field of SRC's results.json, dotted for nested ones (``train.lr``), and VALUE what it
must be (read as JSON where it parses: ``train.lr=1e-3`` is the number, ``order=std1`` the string;
``eval_split`` is ``test`` where a run does not record it).
With ``--like REF`` (a run the sweep made itself with the same flags), every other setting must be
REF's too: ``SETTINGS`` (model and its fingerprint, dtype, suite, training-set size, preset, method
options) and every field of ``lora`` and ``train``, but the KEYs asked (which SRC and REF may differ
in: seed, rate, test sizes, scorers). So a default or a shared flag that changed since SRC ran (batch
size, alpha, targets, warm-up...) is caught without being restated here; a REF that is missing or cut
reuses nothing.
SRC is copied to DST only when it is complete, DST does not exist yet, and every field matches; a
mismatch is printed and nothing is copied (the sweep then runs DST itself). Exit status 0 either way,
2 on bad arguments; a SRC or REF whose results.json was edited or damaged (its checksum) is refused
with an error.

``reports/sweeps/methods.toml``'s ``compare`` stage (``[stages.reuse]``) uses it for the runs issue 21's
paired re-run already made with the same flags (seq-lora and SLAO at lr 1e-3 on std1): a run is 20-40
minutes on the 2-core machine.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mbf.experiment import results as results_file

# the settings --like compares beside every field of "lora" and "train" (results.py documents each)
SETTINGS = ("model", "model_fingerprint", "dtype", "suite", "n_train", "preset", "options")


def _field(res: dict, key: str):
    if key in results_file.DEFAULTED:  # dtype, eval_split: absent means float32, test
        return results_file.DEFAULTED[key](res)
    value = res
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return KeyError
        value = value[part]
    return value


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def mismatches(res: dict, expected: dict[str, object]) -> list[str]:
    """``key: has X, asked Y`` for every expected field that differs (numbers compare as numbers; an
    expected ``KeyError``: a field the reference run does not have, so neither may ``res``)."""
    out = []
    for key, want in expected.items():
        have = _field(res, key)
        if have is KeyError and want is not KeyError:
            out.append(f"{key}: missing, asked {want!r}")
        elif want is KeyError and have is not KeyError:
            out.append(f"{key}: has {have!r}, the reference run has none")
        elif have != want:
            out.append(f"{key}: has {have!r}, asked {want!r}")
    if not res.get("complete"):
        out.append("complete: the run is cut")
    return out


def like(ref: dict, asked: set[str]) -> dict[str, object]:
    """REF's value of every setting ``--like`` compares, but the ``asked`` keys."""
    keys = [*SETTINGS, *(f"{group}.{k}" for group in ("lora", "train") for k in ref.get(group, {}))]
    return {key: _field(ref, key) for key in keys if key not in asked}


def main(argv: list[str]) -> int:
    ref = None
    if len(argv) > 1 and argv[0] == "--like":
        ref, argv = Path(argv[1]), argv[2:]
    if len(argv) < 3 or not all("=" in a for a in argv[2:]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if dst.exists() or not (src / "results.json").is_file():
        return 0
    expected = {k: _value(v) for k, v in (a.split("=", 1) for a in argv[2:])}
    if ref is not None:
        if not (ref / "results.json").is_file():
            print(f"{src}: not reused for {dst} (no run at {ref} to compare its settings with)")
            return 0
        ref_res = results_file.read(ref)
        if not ref_res.get("complete"):
            print(f"{src}: not reused for {dst} ({ref} is cut)")
            return 0
        expected = {**like(ref_res, set(expected)), **expected}
    bad = mismatches(results_file.read(src), expected)  # (refuses an edited or damaged file)
    if bad:
        print(f"{src}: not reused for {dst} ({'; '.join(bad)})")
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    print(f"{dst}: reused {src} (same {', '.join(expected) if ref is None else f'settings as {ref}'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Mutation check, on demand: one-line bugs the suite once let through, against the tests meant to catch them.

Every mutant is a textual find/replace in one source file. The script never edits the working tree: it
copies the checkout's files (tracked and untracked-but-not-ignored, as git lists them) into a temporary
folder, applies one mutant at a time THERE, runs only that mutant's named tests with the checkout's
interpreter, puts the file back (try/finally: also on Ctrl-C or an error), and finally deletes the copy.
A mutant whose pattern is not found exactly once is reported, not guessed at (the source moved on:
update the mutant). The named tests first run once unmutated: a test that fails there catches nothing.

    .venv/bin/python tools/mutate.py                 # every mutant, then the table
    .venv/bin/python tools/mutate.py --only 3 5a     # some of them
    .venv/bin/python tools/mutate.py --list          # what each mutant changes, and its tests

Not part of CI or ``make test`` (about a minute on 2 cores). Exit status 0 when every mutant is caught by
at least one of its tests, 1 otherwise, 2 when the set-up itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # one pytest run


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    what: str
    file: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest node ids (a parametrised function: every parameter set)


MUTANTS = (
    Mutant(
        "1", "NF4: nested 8-bit scales tiled across 256-groups instead of interleaved",
        "mbf/nf4/format.py",
        "self.absmax_scale.repeat_interleave(NESTED_BLOCKSIZE)",
        "self.absmax_scale.repeat(NESTED_BLOCKSIZE)",
        ("tests/test_quant.py::test_bit_exact_to_bitsandbytes_at_real_sizes",
         "tests/test_quant.py::test_nested_scale_of_block_b_is_group_b_over_256",
         "tests/test_kernel_nf4.py::test_dequant_kernel_bit_exact_to_bitsandbytes_over_several_nested_groups"),
    ),
    Mutant(
        "2", "NF4: the nested scales' offset dropped",
        "mbf/nf4/format.py",
        "        return out + self.absmax_offset\n",
        "        return out\n",
        ("tests/test_qlora.py::test_matches_bnb_linear4bit_with_peft",),
    ),
    Mutant(
        "3", "paired intervals: the pairing key ignores the seed",
        "mbf/experiment/paired.py",
        'return (tuple(results["tasks"]), results.get("seed"), results.get("data_fingerprint"))',
        'return (tuple(results["tasks"]), results.get("data_fingerprint"))',
        ("tests/test_stats.py::test_compare_intervals_pairs_each_seed_with_its_own_seed",),
    ),
    Mutant(
        "4", "λ(1) = 1 dropped for the constant schedule",
        "mbf/closed_form.py",
        'if i == 1 or schedule == "none":',
        'if (i == 1 and schedule != "constant") or schedule == "none":',
        ("tests/test_closed_form.py::test_task_one_gets_lambda_one_on_every_schedule",
         "tests/test_continual.py::test_schedules"),
    ),
    Mutant(
        "5a", "QR, torch path: a zero diagonal of R counted as -1",
        "mbf/functional/ortho.py",
        "signs = torch.where(diag < 0, -1.0, 1.0)",
        "signs = torch.where(diag <= 0, -1.0, 1.0)",
        ("tests/test_ortho.py::test_a_zero_diagonal_counts_as_plus_one[torch]",),
    ),
    Mutant(
        "5b", "QR, Triton kernel: a zero row's completion counted as -e_j",
        "mbf/kernels/ortho.py",
        "return x + tl.where(cols == e_col, 1.0, 0.0)",
        "return x - tl.where(cols == e_col, 1.0, 0.0)",
        ("tests/test_ortho.py::test_a_zero_diagonal_counts_as_plus_one[triton]",),
    ),
    Mutant(
        "6", "InfLoRA: the designed rows' scale 1/√3 replaced by 1",
        "mbf/closed_form.py",
        "INFLORA_SCALE = 3**-0.5",
        "INFLORA_SCALE = 1.0",
        ("tests/test_closed_form.py::test_inflora_row_scale_is_one_over_root_three",
         "tests/test_inflora.py::test_designed_rows_are_the_top_free_directions_and_orthogonal_to_the_memory"),
    ),
    Mutant(
        "7", "checkpoint: the SHA-256 reads the first MiB only",
        "mbf/checkpoint.py",
        '        for chunk in iter(lambda: f.read(1 << 20), b""):\n            h.update(chunk)\n',
        "        h.update(f.read(1 << 20))\n",
        ("tests/test_reliability.py::test_a_flipped_byte_past_the_first_mib_is_caught",),
    ),
    Mutant(
        "8", "dispatch: the margin 2 % -> 20 %",
        "mbf/functional/dispatch.py",
        "MARGIN = 0.02",
        "MARGIN = 0.20",
        ("tests/test_dispatch.py::test_the_margin_is_two_percent_on_a_quiet_timer",),
    ),
)  # fmt: skip


# -- the copy ---------------------------------------------------------------------------------------


def _listed_files(root: Path) -> list[str]:
    """What the checkout holds: tracked and untracked files git does not ignore (no .venv, caches)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout  # fmt: skip
    return sorted({f for f in out.decode().split("\0") if f and (root / f).is_file()})


def make_copy(root: Path, dest: Path) -> None:
    """Copy (never hard-link: a mutant must not reach the checkout) the listed files under ``dest``."""
    for rel in _listed_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant of the original's size must never leave a stale .pyc
    return env


def check_imports(copy: Path) -> None:
    """The copy's ``mbf`` and ``mbf.kernels`` are the ones imported there, not the checkout's."""
    code = "import mbf, mbf.kernels; print(mbf.__file__); print(mbf.kernels.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=_env(), capture_output=True, text=True, check=True
    ).stdout.split()
    for f in out:
        if not Path(f).is_relative_to(copy):
            raise RuntimeError(f"the copy imports {f}, outside {copy}: mutants would not apply")


# -- running the tests ------------------------------------------------------------------------------


def run_tests(copy: Path, tests: tuple[str, ...], report: Path) -> dict[str, str]:
    """Per named test: "passed", "failed" (a failure or error in any of its parameter sets), "skipped"
    (all skipped) or "not run" (collected nothing, or pytest itself failed)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"--junitxml={report}", *tests]  # fmt: skip
    report.unlink(missing_ok=True)
    try:
        subprocess.run(cmd, cwd=copy, env=_env(), capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {t: "timed out" for t in tests}
    outcomes: dict[str, list[str]] = {t: [] for t in tests}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            module = case.get("classname", "").replace(".", "/") + ".py"
            name = case.get("name", "")
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            for t in tests:
                path, _, func = t.partition("::")
                if path == module and (name == func or ("[" not in func and name.startswith(func + "["))):
                    outcomes[t].append(kind)
    result = {}
    for t, kinds in outcomes.items():
        if not kinds:
            result[t] = "not run"
        elif any(k in ("failure", "error") for k in kinds):
            result[t] = "failed"
        elif all(k == "skipped" for k in kinds):
            result[t] = "skipped"
        else:
            result[t] = "passed"
    return result


def apply_and_run(copy: Path, m: Mutant, report: Path) -> dict[str, str] | str:
    """The mutant applied to the copy's file, its tests run, the file restored (always)."""
    path = (copy / m.file).resolve()
    if not path.is_relative_to(copy.resolve()):
        raise RuntimeError(f"{m.file} resolves outside the copy")
    original = path.read_bytes()
    text = original.decode()
    n = text.count(m.find)
    if n != 1:
        return f"pattern found {n} times in {m.file}: update mutant {m.id}"
    try:
        path.write_bytes(text.replace(m.find, m.replace).encode())
        return run_tests(copy, m.tests, report)
    finally:
        path.write_bytes(original)
        assert path.read_bytes() == original


# -- the table ------------------------------------------------------------------------------------


def _verdict(before: str, after: str) -> str:
    if before != "passed":
        return f"no (unmutated: {before})"
    return {"failed": "yes", "passed": "NO", "skipped": "no (skipped)"}.get(after, f"no ({after})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        known = ", ".join(m.id for m in MUTANTS)
        print(f"unknown mutant id in {args.only}; known: {known}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.what}\n    {m.file}: {m.find.strip()!r} -> {m.replace.strip()!r}")
            for t in m.tests:
                print(f"    {t}")
        return 0

    # a kill (SIGTERM) unwinds like Ctrl-C, so the finally below deletes the copy (the checkout is never
    # mutated either way: only the copy is)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows: list[tuple[str, str, str]] = []
    caught_all = True
    tmp = Path(tempfile.mkdtemp(prefix="mbf-mutate-"))
    try:
        copy = tmp / "tree"
        make_copy(ROOT, copy)
        check_imports(copy)
        report = tmp / "report.xml"
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        print(f"unmutated: {len(all_tests)} tests ...", flush=True)
        baseline = run_tests(copy, all_tests, report)
        for m in chosen:
            print(f"mutant {m.id}: {m.what} ...", flush=True)
            got = apply_and_run(copy, m, report)
            if isinstance(got, str):  # the pattern is gone
                rows.append((f"{m.id} {m.what}", "-", f"not applied: {got}"))
                caught_all = False
                continue
            verdicts = [_verdict(baseline[t], got[t]) for t in m.tests]
            caught_all &= "yes" in verdicts
            rows += [(f"{m.id} {m.what}", t, v) for t, v in zip(m.tests, verdicts)]
    except subprocess.CalledProcessError as err:
        print(f"set-up failed: {err}\n{err.stderr}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    head = ("mutant", "test", "caught")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print("\n" + line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    return 0 if caught_all else 1


if __name__ == "__main__":
    sys.exit(main())

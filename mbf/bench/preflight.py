"""What each stage of the one-go GPU run needs, checked before the first stage starts.

A lent GPU machine has torch, Triton, transformers and peft but no registry, and the checkout is
installed there without dependencies: a module the image lacks would otherwise end or empty the run
minutes into the lease. ``check`` imports every module and looks for every file a stage needs, one
line each::

    preflight: peft 0.17.1 ok
    preflight: pytest MISSING (No module named 'pytest') -> stages correctness, tests skipped

and ``mbf.bench.gpu`` then runs the stages whose needs are met, records the others as skipped in
``timeline.json``, and skips the rows of a provider whose package is missing (PEFT, bitsandbytes)
instead of failing them one by one. No stage loads the embedded GGUF model (the training step and
the task boundary build random-weight Llamas from their configs), so it is not checked.

This module imports nothing outside the standard library at import time: ``bench/run_gpu.sh`` runs
it by path, before ``mbf`` or ``mbf.bench`` (whose import needs safetensors, transformers,
tqdm and matplotlib) is known to import; where they do, it hands its checks to ``mbf.bench.gpu``
in the same process (the modules it imported stay imported: nothing is imported twice) through the
``stages`` callback that the script passes, so that this module never imports ``mbf.bench.gpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["EVERY", "NEEDS", "Check", "Need", "check", "lines", "lost_providers", "main", "skipped_stages"]

ROOT = Path(__file__).resolve().parents[2]
EVERY = "*"  # a need of every stage
MIN_TRITON = (3, 6)  # the lowest Triton the kernels are compiled and tested with (pyproject.toml)
KERNEL_MODULES = ("lora_op", "nf4", "ortho", "merge")
TEST_FILES = ("test_kernel_lora.py", "test_kernel_nf4.py", "test_ortho.py", "test_merge.py", "test_qlora.py")


@dataclasses.dataclass(frozen=True)
class Need:
    """One thing a stage needs: a module to import or files to find."""

    name: str  # what its preflight line names
    stages: tuple[str, ...] = ()  # stages that cannot run without it (EVERY: all of them)
    providers: tuple[str, ...] = ()  # else: the providers whose rows are skipped without it
    degrades: str = ""  # else: what runs worse without it


@dataclasses.dataclass(frozen=True)
class Check:
    """A need, checked: ``ok`` and a detail (the version found, or why it is missing)."""

    need: Need
    ok: bool
    detail: str = ""

    def to_json(self) -> dict:
        n = self.need
        return {"need": n.name, "ok": self.ok, "detail": self.detail, "stages": list(n.stages),
                "providers": list(n.providers), "degrades": n.degrades}  # fmt: skip


_TEST_PATHS = tuple(f"tests/{f}" for f in TEST_FILES)
# in check order: what a later one needs (mbf: safetensors; peft: transformers) is named first
NEEDS = (
    Need("torch", (EVERY,)),
    Need("CUDA", (EVERY,)),  # a GPU run only; the dry run is the CPU and Triton's interpreter
    Need("triton", (EVERY,)),  # every stage launches the kernels, the two pytest stages included
    Need("safetensors", (EVERY,)),  # mbf.io imports it: without it `import mbf` fails
    Need("mbf", (EVERY,)),  # the package and its four kernel modules
    Need("transformers", ("train step",)),  # the Llama models of the training step
    Need("peft", providers=("peft", "peft-bnb4")),
    Need("bitsandbytes", providers=("peft-bnb4",)),
    Need("pytest", ("correctness", "tests")),
    Need("xdist", degrades="the GPU tests run in one process instead of 8"),
    Need("mbf.bench", (EVERY,)),  # the measuring library: its import needs transformers, tqdm, matplotlib
    Need("tests/test_dispatch.py", ("correctness",)),
    Need(f"{len(_TEST_PATHS)} GPU test files", ("tests",)),
)

Importer = Callable[[str], object]


def _version(module) -> str:
    return str(getattr(module, "__version__", "")).split("+")[0]


def _why(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:160]


def _probe(need: Need, importer: Importer, dry_run: bool, root: Path) -> Check | None:
    """Check one need (None: not a need of this run)."""
    name = need.name
    try:
        if name == "CUDA":
            if dry_run:
                return None
            torch = importer("torch")
            if not torch.cuda.is_available():
                return Check(need, False, "torch.cuda.is_available() is False")
            return Check(need, True, f"{torch.version.cuda}, {torch.cuda.get_device_name()}")
        if name == "mbf":
            importer("mbf")
            for kernel in KERNEL_MODULES:
                importer(f"mbf.kernels.{kernel}")
            return Check(need, True, f"(kernels {', '.join(KERNEL_MODULES)})")
        if name.endswith(".py") or name.endswith("test files"):
            paths = ("tests/test_dispatch.py",) if name.endswith(".py") else _TEST_PATHS
            absent = [p for p in paths if not (root / p).is_file()]
            return Check(need, not absent, f"not found: {', '.join(absent)}" if absent else "")
        module = importer(name)
        version = _version(module)
        if name == "triton" and version:
            found = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
            if found < MIN_TRITON:  # pyproject.toml's floor
                lowest = ".".join(map(str, MIN_TRITON))
                return Check(need, False, f"{version}, older than {lowest}, the kernels' lowest tested")
        if name == "bitsandbytes":
            version += " (from wheels/)" if os.environ.get("MBF_BNB_FROM_WHEEL") else ""
        return Check(need, True, version)
    except Exception as err:  # noqa: BLE001 - ImportError, and whatever a broken package raises on import
        detail = _why(err)
        if name == "bitsandbytes":
            wheels = os.environ.get("BNB_WHEEL_DIR", "wheels")
            if not list((root / wheels).glob("bitsandbytes-*.whl")):
                detail += f"; no bitsandbytes-*.whl in {wheels}/ (`make bnb-wheel`, then carry the folder)"
        return Check(need, False, detail)


def check(dry_run: bool, importer: Importer = importlib.import_module, root: Path = ROOT) -> list[Check]:
    """Every need of this run (``dry_run``: no CUDA), checked in order by importing it with ``importer``."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    return [c for need in NEEDS if (c := _probe(need, importer, dry_run, root)) is not None]


def skipped_stages(checks: list[Check], stages: list[str]) -> dict[str, list[str]]:
    """``{stage: [the needs it lacks]}`` for every stage of ``stages`` that cannot run."""
    out: dict[str, list[str]] = {}
    for c in checks:
        if not c.ok:
            for stage in stages if EVERY in c.need.stages else c.need.stages:
                out.setdefault(stage, []).append(c.need.name)
    return {s: out[s] for s in stages if s in out}


def lost_providers(checks: list[Check]) -> dict[str, list[str]]:
    """``{provider: [the needs it lacks]}``: providers whose rows the stages skip."""
    out: dict[str, list[str]] = {}
    for c in checks:
        if not c.ok:
            for p in c.need.providers:
                out.setdefault(p, []).append(c.need.name)
    return out


def lines(checks: list[Check]) -> list[str]:
    """One line per need: ``preflight: <name> <version> ok`` or what is skipped without it."""
    out = []
    for c in checks:
        n = c.need
        if c.ok:
            out.append(f"preflight: {n.name} {c.detail + ' ' if c.detail else ''}ok")
            continue
        if EVERY in n.stages:
            then = "every stage skipped"
        elif n.stages:
            then = f"stage{'s' if len(n.stages) > 1 else ''} {', '.join(n.stages)} skipped"
        elif n.providers:
            then = f"rows of {', '.join(n.providers)} skipped"
        else:
            then = n.degrades
        out.append(f"preflight: {n.name} MISSING ({c.detail}) -> {then}")
    return out


def main(argv: list[str] | None = None, stages: Callable[[list[str], list, float], int] | None = None) -> int:
    """Check every need, then hand the checks to ``stages(argv, checks, seconds)`` (``bench/run_gpu.sh``
    passes one that runs ``mbf.bench.gpu`` in this process; None: print the checks, return 0); when no
    stage can run (the package or its measuring library does not import), print why and return 3."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args, _ = parser.parse_known_args(argv)
    start = time.time()
    checks = check(args.dry_run)
    fatal = [c for c in checks if not c.ok and EVERY in c.need.stages]
    if not fatal:
        if stages is None:
            print("\n".join(lines(checks)), flush=True)
            return 0
        return stages(argv, checks, time.time() - start)
    text = "\n".join([*lines(checks), "run_gpu.sh: no stage can run; nothing was measured"])
    print(text, flush=True)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None:  # what the device returns: the log and a timeline that says why it is empty
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.log").write_text(text + "\n")
        entry = {"stage": "preflight", "status": "failed", "seconds": round(time.time() - start, 1),
                 "checks": [c.to_json() for c in checks]}  # fmt: skip
        (out / "timeline.json").write_text(json.dumps([entry], indent=1))
    return 3


if __name__ == "__main__":
    raise SystemExit(main())

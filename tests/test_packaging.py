"""Packaging: the checkout stands in for no other distribution's import name (issue 38).

``kernels`` is Hugging Face's distribution (imported by that name by transformers >= 5 and by
bitsandbytes). The Triton kernels are ``mbf/kernels/`` (``mbf.kernels``); the top-level ``kernels/``
folder holds no Python, so the repository root on ``sys.path`` (``python -c``/``-m``, pytest, run from the
root) never makes ``import kernels`` find the checkout, and nothing patches ``sys.modules``.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run with the repository root as the working directory and first on sys.path
_PROBE = """
import importlib.util, json, os, sys

def where(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    return {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}

root_on_path = any(os.path.abspath(p or ".") == os.getcwd() for p in sys.path)
out = {"root_on_path": root_on_path, "before": where("kernels")}
import transformers, mbf
out["after"] = where("kernels")
out["mbf.kernels"] = importlib.util.find_spec("mbf.kernels").origin
print(json.dumps(out))
"""


def _run_from_root(code: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(root), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def _pypi_kernels_init() -> Path | None:
    """PyPI's ``kernels/__init__.py`` where that distribution is installed (transformers >= 5), else None."""
    try:
        init = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return init.resolve() if init.is_file() else None


def _inside(path: str | None, root: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(root.resolve())


def _in_checkout(path: str | None) -> bool:
    """In the repository's own files (a virtual environment inside it, such as .venv, is not)."""
    return _inside(path, ROOT) and not _inside(path, Path(sys.prefix))


def test_the_top_level_kernels_folder_holds_no_python():
    assert not list((ROOT / "kernels").glob("*.py"))  # no __init__.py either: never a regular package
    spec = importlib.util.find_spec("mbf.kernels")
    assert spec is not None and Path(spec.origin).resolve() == (ROOT / "mbf/kernels/__init__.py").resolve()


def test_nothing_under_mbf_assigns_sys_modules():
    assignment = re.compile(r"sys\.modules\[[^\]]*\]\s*=(?!=)|sys\.modules\.(setdefault|update)\(")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "mbf").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if assignment.search(line)]  # fmt: skip
    assert not found


def test_kernels_from_the_repository_root_is_not_the_checkout():
    """``python -c`` from the root: ``kernels`` resolves outside the repository, before and after
    ``import transformers, mbf`` (PyPI's where installed; else nothing, or at most the README folder as an
    empty namespace package, which has no code to run)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the [app] extra)")
    run = _run_from_root(_PROBE)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["root_on_path"]
    pypi = _pypi_kernels_init()
    for when in ("before", "after"):
        spec = out[when]
        if pypi is not None:  # PyPI's kernels is installed: `kernels` must be it (site-packages)
            assert spec is not None and Path(spec["origin"]).resolve() == pypi, (when, spec)
            assert not _in_checkout(spec["origin"]), (when, spec)
        elif spec is not None:  # no PyPI kernels: nothing, or a namespace portion without code
            assert spec["origin"] is None or not _in_checkout(spec["origin"]), (when, spec)
    assert _inside(out["mbf.kernels"], ROOT / "mbf" / "kernels")


def test_bitsandbytes_from_the_repository_root_finds_pypis_kernels():
    """bitsandbytes' CPU backend runs ``from kernels import get_kernel`` at import; from the root it
    failed with "cannot import name 'get_kernel' from 'kernels' (<root>/kernels/__init__.py)".
    (Other "Failed to load ... from kernels-community" lines, the hub kernel itself being refused or
    unreachable offline, are bitsandbytes' and happen in any directory.)"""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    run = _run_from_root("import bitsandbytes")
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    assert "cannot import name" not in text, text[-3000:]
    assert str(ROOT / "kernels") not in text, text[-3000:]

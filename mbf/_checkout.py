"""The checkout's ``kernels/`` folder (installed as ``mbf.kernels``) must not stand in for PyPI's ``kernels``.

Hugging Face's ``kernels`` is a dependency of transformers (≥ 5), imported by the name ``kernels``. Where
the checkout's root is on ``sys.path`` (``python -c`` or ``python -m`` run from it, ``make test``, a
notebook started there), that name finds this repository's ``kernels/`` first, and every
``from_pretrained`` fails with ``ImportError: cannot import name 'CUDAProperties' from 'kernels'``.
``prefer_installed_kernels()`` (run by ``import mbf``) imports the installed distribution under its own
name first, from where pip put it, so that ``kernels`` means it for everyone afterwards; it does nothing
when nothing shadows it (an installed wheel has no top-level ``kernels/``; any other working directory).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

__all__ = ["prefer_installed_kernels"]


def prefer_installed_kernels() -> None:
    if "kernels" in sys.modules:
        return
    try:
        found = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    ours = importlib.util.find_spec("mbf.kernels")  # (does not run it) the checkout's kernels/ when editable
    if found is None or found.origin is None or ours is None or ours.origin is None:
        return
    if Path(found.origin).resolve() != Path(ours.origin).resolve():
        return  # not shadowed
    try:
        init = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return  # PyPI's kernels is not installed: nothing to prefer (transformers <5 does not need it)
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # a broken install stays transformers' to report, as without this
        del sys.modules["kernels"]

"""Backend names and the lazy import of the kernel modules.

``resolve_backend`` answers for the ops that measure nothing (``orthonormal_rows``, ``project_out``,
``time_aware_merge_``): ``auto`` is ``mbf.kernels.route.unmeasured``, the Triton kernels for CUDA
tensors and torch for CPU ones, unless ``backend=`` forces one. The LoRA linear's path is the route's
(``mbf.kernels.route``: measured on CUDA by ``mbf.functional.dispatch``, by rank, base and tokens).
"""

from __future__ import annotations

import importlib
import sys

import torch

from mbf.config import BACKENDS
from mbf.kernels import route

__all__ = ["BACKENDS", "check_backend", "kernel", "resolve_backend"]


def kernel(module: str, name: str):
    """``mbf.kernels.<module>.<name>``, imported on first use (``import mbf`` never needs triton).

    Raises:
        NotImplementedError: when triton (or the kernel module) cannot be imported here.
    """
    loaded = sys.modules.get(f"mbf.kernels.{module}")  # imported: no import call (torch.compile traces this)
    if loaded is not None:
        return getattr(loaded, name)
    try:
        return getattr(importlib.import_module(f"mbf.kernels.{module}"), name)
    except ImportError as err:
        raise NotImplementedError(
            f"backend='triton': mbf.kernels.{module} cannot be imported ({err})"
        ) from err


def check_backend(backend: str) -> None:
    """Check that ``backend`` names a ``lora_linear`` backend (``mbf.config.BACKENDS``).

    Raises:
        ValueError: on an unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """``"torch"`` or ``"triton"`` for these tensors where nothing is measured: ``"auto"`` picks Triton
    for CUDA tensors (``route.unmeasured``).

    Raises:
        ValueError: on an unknown backend name.
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    return route.unmeasured(any(t is not None and t.is_cuda for t in tensors))

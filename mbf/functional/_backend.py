"""Which path runs where ``auto`` is not measured: Triton for CUDA tensors, PyTorch for CPU ones, unless
``backend=`` forces one; and the lazy import of the kernel modules."""

from __future__ import annotations

import importlib
import sys

import torch

from mbf.config import BACKENDS

__all__ = ["BACKENDS", "kernel", "resolve_backend"]


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


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """``"torch"`` or ``"triton"`` for these tensors: ``"auto"`` picks Triton for CUDA tensors.

    Raises:
        ValueError: on an unknown backend name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "triton" if any(t is not None and t.is_cuda for t in tensors) else "torch"

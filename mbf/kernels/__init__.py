"""Triton kernels of mbf (installed as ``mbf.kernels``): kernels, launchers and autograd glue only.

Nothing here knows about nn.Module or transformers. Each kernel module imports triton at its own
import, so ``import mbf`` (and this package) never needs triton.
"""

import os

__all__ = ["interpreting"]


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET``, read as Triton reads it).

    Decided at every launch, never at import.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

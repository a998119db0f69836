"""NF4 (QLoRA 4-bit) weights in bitsandbytes' exact storage.

``mbf.nf4.format``: the layout, quantiser and dequantiser (pure PyTorch, the kernels' twin);
``mbf.nf4.bnb``: zero-copy conversion from and to bitsandbytes' ``Linear4bit`` (lazy import).
The frozen 4-bit module is ``mbf.nn.NF4Linear``.
"""

from mbf.nf4 import bnb, format
from mbf.nf4.bnb import *  # noqa: F403
from mbf.nf4.format import *  # noqa: F403

__all__ = [*format.__all__, *bnb.__all__]

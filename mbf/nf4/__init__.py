"""NF4 (QLoRA 4-bit) weights in bitsandbytes' exact storage.

``mbf.nf4.format``: the layout, quantiser and dequantiser (pure PyTorch, the kernels' twin);
``mbf.nf4.bnb``: zero-copy conversion from and to bitsandbytes' ``Linear4bit`` (lazy import).
The frozen 4-bit module is ``mbf.nn.NF4Linear``.
"""

from mbf.nf4.bnb import is_bnb_linear4bit, make_linear4bit, quantize, to_bnb_linear4bit, weight_from_bnb
from mbf.nf4.format import (
    BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
    with_dtype,
)

__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "NF4Weight",
    "dequantize_nf4",
    "dynamic_map",
    "is_bnb_linear4bit",
    "make_linear4bit",
    "quantize",
    "quantize_nf4",
    "to_bnb_linear4bit",
    "weight_from_bnb",
    "with_dtype",
]

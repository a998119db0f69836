"""bitsandbytes interop: view a ``Linear4bit``'s NF4 storage zero-copy, and build one from ours.

bitsandbytes is imported lazily (``pip install mbf-lora[qlora]``); recognising one of its modules
needs no import at all.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import nn

from mbf.nf4.format import BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE, NF4Weight, quantize_nf4, quantize_nf4_checks

__all__ = [
    "bitsandbytes",
    "is_bnb_linear4bit",
    "make_linear4bit",
    "quantize",
    "to_bnb_linear4bit",
    "weight_from_bnb",
    "weight_from_state",
]

QLORA_HINT = "pip install mbf-lora[qlora]"


def bitsandbytes():
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(f"bitsandbytes is not installed; it is needed here: {QLORA_HINT}") from err


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked by its weight's class: no bitsandbytes import)."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def quantize(weight: torch.Tensor, double_quant: bool = True, name: str = "weight") -> NF4Weight:
    """NF4 storage of a dense ``(out, in)`` weight, identical to what bitsandbytes stores for it.

    With bitsandbytes installed its own quantiser runs (``quantize_4bit``), so the storage is
    bitsandbytes' to the bit; without it, the pure-PyTorch twin ``mbf.nf4.quantize_nf4``, which is
    NOT bit-exact to it: same 4-bit codes, nested scales and offset, but the nested 8-bit absmax code
    differs in ~0.2 % of blocks (see ``quantize_nf4``).

    Raises:
        ValueError: when ``in`` is not a multiple of 64 or the weight is not 2-D floating point.
    """
    try:
        from bitsandbytes.functional import quantize_4bit
    except ImportError:
        return quantize_nf4(weight, double_quant, name)
    quantize_nf4_checks(weight, name)
    packed, qs = quantize_4bit(
        weight.detach().contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4"
    )
    return weight_from_state(packed, qs, name, weight.dtype)


def weight_from_bnb(param, name: str, compute_dtype: torch.dtype | None = None) -> NF4Weight:
    """Views of a quantised ``Params4bit``'s storage and ``quant_state`` (no copy)."""
    qs = param.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes repacked it in place for its CPU inference kernel; undo it the way bitsandbytes
        # does when it saves or moves the weight (a copy, with its absmax rounded through bf16).
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        warnings.warn(
            f"{name}: bitsandbytes had repacked this CPU weight for inference (bf16 absmax); converting it "
            "back to the standard NF4 layout (a copy, absmax re-quantised as bitsandbytes does)",
            stacklevel=3,
        )
        param.data, qs = _convert_weight_packed_for_cpu_inverse(param.data, qs)
        param.quant_state = qs
    return weight_from_state(param.data, qs, name, compute_dtype)


def weight_from_state(packed, qs, name: str, compute_dtype: torch.dtype | None = None) -> NF4Weight:
    """Views of bitsandbytes' packed 4-bit storage and its ``QuantState`` (no copy)."""
    if qs.quant_type != "nf4":
        raise ValueError(
            f"{name}: 4-bit quant_type {qs.quant_type!r} is not supported; use bnb_4bit_quant_type='nf4'"
        )
    if qs.blocksize != BLOCKSIZE:
        raise ValueError(f"{name}: 4-bit blocksize {qs.blocksize} is not supported; only {BLOCKSIZE}")
    if len(qs.shape) != 2 or qs.shape[1] % BLOCKSIZE:
        raise ValueError(
            f"{name}: weight shape {tuple(qs.shape)} needs in_features a multiple of {BLOCKSIZE}"
        )
    packed = packed.view(torch.uint8).reshape(-1)  # [(n+1)//2, 1] storage, any quant_storage dtype
    code = qs.code.float() if qs.code is not None else torch.tensor(NF4_CODE, device=packed.device)
    dtype = compute_dtype or qs.dtype
    if not qs.nested:
        return NF4Weight(packed, qs.absmax.float(), None, None, None, code, tuple(qs.shape), dtype)
    if qs.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{name}: nested absmax blocksize {qs.state2.blocksize} is not supported; only 256")
    offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device)
    return NF4Weight(
        packed, qs.absmax, qs.state2.absmax, offset, qs.state2.code, code, tuple(qs.shape), dtype
    )


def _linear4bit(in_f: int, out_f: int, bias: bool, dtype: torch.dtype, double_quant: bool, quant_type: str):
    return bitsandbytes().nn.Linear4bit(
        in_f, out_f, bias=bias, compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
        device="meta",
    )  # fmt: skip


def make_linear4bit(
    linear: nn.Linear,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    device: torch.device | str | None = None,
    quant_type: str = "nf4",
    blocksize: int = BLOCKSIZE,
) -> nn.Module:
    """``bnb.nn.Linear4bit`` quantised BY BITSANDBYTES from a dense linear (NF4, blocksize 64 by default).

    bitsandbytes quantises on the move to a device, so the result lives on ``device`` (default: the
    linear's). It is what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4"))`` builds, for tests and benchmarks; other
    ``quant_type``/``blocksize`` values build the layers mbf refuses.
    """
    compute_dtype = compute_dtype or linear.weight.dtype
    bias = linear.bias is not None
    layer = _linear4bit(
        linear.in_features, linear.out_features, bias, compute_dtype, double_quant, quant_type
    )
    layer.weight = bitsandbytes().nn.Params4bit(
        linear.weight.data.detach().clone().cpu(), requires_grad=False, quant_type=quant_type,
        blocksize=blocksize, compress_statistics=double_quant,
    )  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone().to(compute_dtype), requires_grad=False)
    return layer.to(device or linear.weight.device)


def to_bnb_linear4bit(w: NF4Weight, bias: torch.Tensor | None = None) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` sharing the tensors of ``w`` (no copy, no re-quantisation)."""
    bnb = bitsandbytes()
    from bitsandbytes.functional import QuantState

    state2 = None
    if w.double_quant:
        state2 = QuantState(
            absmax=w.absmax_scale, code=w.absmax_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
    qs = QuantState(
        absmax=w.absmax, shape=torch.Size(w.shape), code=w.code, blocksize=BLOCKSIZE, quant_type="nf4",
        dtype=w.dtype, offset=w.absmax_offset, state2=state2,
    )  # fmt: skip
    out_f, in_f = w.shape
    layer = _linear4bit(in_f, out_f, bias is not None, w.dtype, w.double_quant, "nf4")
    layer.weight = bnb.nn.Params4bit(
        w.packed.view(-1, 1), requires_grad=False, quant_state=qs, blocksize=BLOCKSIZE,
        compress_statistics=w.double_quant, quant_type="nf4", bnb_quantized=True,
    )  # fmt: skip
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return layer

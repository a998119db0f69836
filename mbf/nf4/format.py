"""NF4 weights in bitsandbytes' exact storage: the format, its quantiser and its dequantiser.

The layout (bitsandbytes ``quant_type="nf4"``, ``blocksize=64``, ``compress_statistics=True``):

    packed[i]   uint8, (out·in / 2,)   codes of the flattened row-major ``W[out, in]``; element 2i in
                                       the HIGH nibble, element 2i + 1 in the low nibble
    absmax[b]   uint8, (out·in / 64,)  per-64-block scale, itself quantised ("double quant"):
                absmax[b] = absmax_code[absmax_q[b]] · absmax_scale[b // 256] + absmax_offset
    W[j]        = NF4_CODE[code_j] · absmax[j // 64]        (fp32 math, cast to the compute dtype)

``absmax_code`` is bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map``), ``absmax_scale``
the fp32 absmax of each 256-block of centred scales and ``absmax_offset`` their mean. Storage is
0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes per weight. Without double quant (``BitsAndBytesConfig``'s
default) ``absmax`` is fp32 and the layout is otherwise the same.

:func:`dequantize_nf4` is the pure-PyTorch twin of the Triton kernels (``mbf.kernels.nf4``) and is
bit-exact to ``bitsandbytes.functional.dequantize_4bit``; :func:`quantize_nf4`'s 4-bit codes equal
``bitsandbytes.functional.quantize_4bit``'s, its nested 8-bit absmax codes do not always (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = [
    "BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "NF4Weight",
    "dequantize_nf4",
    "dynamic_map",
    "quantize_nf4",
    "quantize_nf4_checks",
    "with_dtype",
]

BLOCKSIZE = 64  # the only 4-bit blocksize the kernels read (one byte row of 32 per block)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantised absmax

# bitsandbytes.functional.get_4bit_type("nf4"): the 16 quantiles of N(0, 1) of QLoRA, as fp32.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): 256 sorted fp32 values.

    Computed exactly as bitsandbytes does (fp32 linspace and scaling, sorted).
    """
    data: list[float] = []
    for i in range(7):  # exponent 10**(i-6); 2**i fractions each, both signs
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()  # scaled in fp32, as bitsandbytes does
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one NF4 weight (views, never copies) and its logical shape.

    Attributes:
        packed: uint8 ``(out·in / 2,)``, two codes per byte, first element in the high nibble.
        absmax: ``(out·in / 64,)`` uint8 (double quant) or fp32 per-block scales.
        absmax_scale: fp32 ``(ceil(blocks / 256),)`` or None (no double quant).
        absmax_offset: fp32 0-d tensor or None.
        absmax_code: fp32 ``(256,)`` dynamic map or None.
        code: fp32 ``(16,)`` NF4 table.
        shape: ``(out, in)``. dtype: the compute / dequantisation dtype.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    absmax_code: torch.Tensor | None
    code: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_scales(self) -> torch.Tensor:
        """fp32 ``(blocks,)`` absmax of every 64-block, bit-exact to bitsandbytes' nested dequant.

        Three separate torch ops on purpose: a fused multiply-add would round differently.
        """
        if not self.double_quant:
            return self.absmax.float()
        scale = self.absmax_scale.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        out = self.absmax_code[self.absmax.long()] * scale
        return out + self.absmax_offset

    def nbytes(self) -> int:
        """Bytes of storage (the figure behind "≈ 0.52 bytes per weight")."""
        ts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset, self.absmax_code, self.code)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The twin of the kernels: ``W (out, in)`` in ``dtype`` (default ``w.dtype``), bit-exact to bnb.

    ``NF4_CODE[code] · absmax`` in fp32, then one cast, as ``bitsandbytes.functional.dequantize_4bit``.
    """
    out_f, in_f = w.shape
    q = torch.stack((w.packed >> 4, w.packed & 0xF), dim=-1).reshape(-1)[: out_f * in_f]  # high first
    vals = w.code[q.long()].view(-1, BLOCKSIZE) * w.block_scales().view(-1, 1)
    return vals.view(out_f, in_f).to(dtype or w.dtype)


def quantize_nf4_checks(weight: torch.Tensor, name: str) -> None:
    """Raise ValueError (naming ``name``) unless ``weight`` is a finite 2-D float, in_features % 64 == 0."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{name}: expected a 2-D floating point weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    if weight.shape[1] % BLOCKSIZE:
        raise ValueError(
            f"{name}: in_features {weight.shape[1]} must be a multiple of {BLOCKSIZE} for the NF4 kernels"
        )
    bad = ~torch.isfinite(weight.detach())
    if bool(bad.any()):  # one NaN would make its block's absmax NaN, and the dequantised matrix NaN
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: weight has {int(bad.sum())} non-finite value(s), first at {first}; not quantised to NF4"
        )


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True, name: str = "weight") -> NF4Weight:
    """Quantise a dense ``(out, in)`` weight to NF4, blocksize 64, as ``bnb.functional.quantize_4bit``.

    The pure-PyTorch twin (``mbf.nf4.quantize`` uses bitsandbytes' own quantiser when installed).
    The 4-bit codes equal bitsandbytes' (its reference implementation: nearest NF4 value by midpoint
    bucketing of ``w · (1 / absmax)``), and so do the nested fp32 scales and the offset. The storage
    is NOT bitsandbytes' to the bit: the nested 8-bit absmax code here is the nearest value of the
    dynamic map (the same midpoint rule), while bitsandbytes' CPU kernel (0.50) looks it up in a
    65,536-entry table over [-1, 1], so within a bin (3e-5) of a midpoint, or near 0 where the map's
    steps are finer than a bin, it keeps a neighbour up to 3 codes away: ~0.2 % of blocks of a
    1024x4096 weight (132 of 65,536). Valid storage either way; here each such block's scale is the
    nearer to its true absmax (tests/test_quant.py). ``mbf.nf4.quantize`` runs bitsandbytes' own
    quantiser when it is installed.

    Raises:
        ValueError: when ``in`` is not a multiple of 64, or the weight is not 2-D floating point or
            holds a NaN or an infinity.
    """
    quantize_nf4_checks(weight, name)
    out_f, in_f = weight.shape
    dev = weight.device
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    blocks = weight.detach().float().reshape(-1, BLOCKSIZE)  # (out·in/64, 64)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, None, code, (out_f, in_f), weight.dtype)
    amap = dynamic_map(dev)
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = -n % NESTED_BLOCKSIZE
    chunks = F.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    scale2 = chunks.abs().amax(dim=1)
    s = (chunks * (1.0 / scale2.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)[:n]
    qa = torch.bucketize(s, (amap[:-1] + amap[1:]) / 2, out_int32=True).to(torch.uint8)
    return NF4Weight(packed, qa, scale2, offset, amap, code, (out_f, in_f), weight.dtype)


def with_dtype(w: NF4Weight, dtype: torch.dtype) -> NF4Weight:
    """The same storage with another compute dtype."""
    return replace(w, dtype=dtype)

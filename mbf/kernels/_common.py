"""What every kernel file of ``mbf.kernels`` shares: one rule each, in one place.

- ``interpreting()`` (defined in the triton-free ``mbf.kernels``): whether Triton runs kernels
  through its CPU interpreter, decided at launch, never at import.
- ``dot``: ``tl.dot`` with fp32 accumulation. Under the interpreter, Triton 3.9 multiplies bf16
  operands as raw bit patterns (triton-lang/triton#11584), so the launchers pass ``UPCAST`` there
  and the tiles go through fp32 first; ``PRECISION`` is ``"tf32x3"`` (fp32-class accuracy on tensor
  cores) or ``"tf32"`` (an fp32 GEMM where torch allows TF32) for fp32 operands, ignored for 16-bit
  ones (``dot_flags``).
- ``tile_ids``: the L2-friendly swizzle of a 1-D grid over an ``(M, N)`` output (Triton's matmul
  tutorial): ``GROUP_M`` row tiles share the column tiles they read.
- ``pad_rank``: ``tl.dot`` needs every dimension ≥ 16, so a rank r is padded to a power of two ≥ 16
  (masked loads fill the padding with zeros).
- ``cast``: the fp32 → 16-bit store conversion, rounding to nearest even under the interpreter too.
- ``configs_pinned``: whether launchers skip autotuning and run one fixed config per kernel.
- ``TL_DTYPES``: torch → Triton element types the kernels accept.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from mbf.kernels import interpreting

__all__ = [
    "TL_DTYPES",
    "bf16_pieces",
    "cast",
    "configs_pinned",
    "device_of",
    "dot",
    "dot_flags",
    "interpreting",
    "pad_rank",
    "tf32_allowed",
    "tf32_high",
    "tile_ids",
]

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MIN_DOT = 16  # smallest dimension tl.dot takes


def pad_rank(r: int) -> int:
    """The rank as the kernels tile it: a power of two ≥ 16."""
    return max(MIN_DOT, triton.next_power_of_2(r))


def tf32_allowed(t: torch.Tensor) -> bool:
    """Whether torch would multiply fp32 tensors living like ``t`` in TF32."""
    return t.is_cuda and torch.backends.cuda.matmul.allow_tf32


def dot_flags(main: torch.Tensor) -> dict:
    """The ``UPCAST`` and ``PRECISION`` constexprs of ``dot`` for a kernel whose main GEMM reads ``main``.

    fp32 operands multiply in one TF32 pass where torch would (an fp32 main operand and TF32 allowed),
    else in three (``"tf32x3"``: hi/lo TF32 splits on tensor cores, ~2⁻²¹ relative error per product,
    fp32-class accuracy without the FMA path's registers and spills). So fp32 adapters over a 16-bit
    base keep fp32-class LoRA products whatever the flag, and a kernel without fp32 operands has one
    variant only (``PRECISION`` is ignored for 16-bit operands). The interpreter computes in IEEE fp32.
    """
    if interpreting():
        return {"UPCAST": True, "PRECISION": "ieee"}
    tf32 = main.dtype == torch.float32 and tf32_allowed(main)
    return {"UPCAST": False, "PRECISION": "tf32" if tf32 else "tf32x3"}


def configs_pinned() -> bool:
    """Launch one fixed config per kernel instead of autotuning: under
    ``torch.use_deterministic_algorithms(True)`` (a timing-dependent choice would change the bits
    between processes) or with ``MBF_PIN_CONFIGS=1`` (GPU correctness runs: one compile per variant).
    """
    pinned = os.environ.get("MBF_PIN_CONFIGS", "0") not in ("", "0")
    return pinned or torch.are_deterministic_algorithms_enabled()


def device_of(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (a no-op on CPU / the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def bf16_pieces(x):
    """Three bf16 tiles summing to the fp32 tile ``x`` within 2⁻²⁶ relative: each piece is the rest
    rounded, and each rest ``x − Σ pieces`` is exact in fp32."""
    p1 = x.to(tl.bfloat16)
    rest = x - p1.to(tl.float32)
    p2 = rest.to(tl.bfloat16)
    p3 = (rest - p2.to(tl.float32)).to(tl.bfloat16)
    return p1, p2, p3


@triton.jit
def tf32_high(x):
    """The fp32 tile ``x`` cut to TF32's 10 mantissa bits: ``x − tf32_high(x)`` is exact and ~2⁻¹¹ x."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32 (see the module docstring for the two flags).

    One operand fp32 and the other 16-bit (fp32 adapters over a 16-bit base: x or dY against an fp32
    LoRA tile): the product is kept fp32-class. Against bf16, the fp32 tile goes as three bf16 pieces
    (``bf16_pieces``): three bf16 MMAs whose products are exact, and the big 16-bit tile (x, dY) stays
    16-bit in registers. Against fp16 (whose narrow exponent would lose small pieces) the fp16 tile
    goes as fp32, exact in TF32, and the fp32 one as a TF32 high part and the exact rest: two TF32
    MMAs, ~2⁻²¹ relative per product (tf32x3 would also split the fp16 side, whose low part is 0).
    """
    # one if / elif chain and one return: Triton's code generator visits what follows a return
    # inside a compile-time branch, so early returns would still type-check the other branches
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == b.dtype:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    elif a.dtype == tl.bfloat16:
        b1, b2, b3 = bf16_pieces(b.to(tl.float32))
        out = tl.dot(a, b3, tl.dot(a, b2, tl.dot(a, b1, acc)))
    elif b.dtype == tl.bfloat16:
        a1, a2, a3 = bf16_pieces(a.to(tl.float32))
        out = tl.dot(a3, b, tl.dot(a2, b, tl.dot(a1, b, acc)))
    elif a.dtype == tl.float16:  # fp16 is exact in TF32: only the fp32 side needs a low part
        a32, b_hi = a.to(tl.float32), tf32_high(b.to(tl.float32))
        out = tl.dot(a32, b - b_hi, tl.dot(a32, b_hi, acc, input_precision="tf32"), input_precision="tf32")
    elif b.dtype == tl.float16:
        b32, a_hi = b.to(tl.float32), tf32_high(a.to(tl.float32))
        out = tl.dot(a - a_hi, b32, tl.dot(a_hi, b32, acc, input_precision="tf32"), input_precision="tf32")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return out


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of this program in a 1-D grid over an ``(M, N)`` output, grouped by GROUP_M rows."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % group_m, (pid % (GROUP_M * num_n)) // group_m


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 → ``dtype`` rounding to nearest even, as CUDA's ``cvt.rn`` and torch's ``.to`` do.

    The interpreter truncates fp32 → bf16: under it the bits are rounded here first (the cast is
    then exact), so interpreted results equal the GPU's bit for bit.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)

"""What every kernel file of ``mbf.kernels`` shares: one rule each, in one place.

- ``interpreting()`` (defined in the triton-free ``mbf.kernels``): whether Triton runs kernels
  through its CPU interpreter, decided at launch, never at import.
- ``dot``: ``tl.dot`` with fp32 accumulation. Under the interpreter, Triton 3.9 multiplies bf16
  operands as raw bit patterns (triton-lang/triton#11584), so the launchers pass ``UPCAST`` there
  and the tiles go through fp32 first; ``PRECISION`` is ``"ieee"`` (true fp32, as torch's matmul with
  TF32 off) or ``"tf32"`` (when torch allows TF32) for fp32 operands, ignored for 16-bit ones.
- ``tile_ids``: the L2-friendly swizzle of a 1-D grid over an ``(M, N)`` output (Triton's matmul
  tutorial): ``GROUP_M`` row tiles share the column tiles they read.
- ``pad_rank``: ``tl.dot`` needs every dimension ≥ 16, so a rank r is padded to a power of two ≥ 16
  (masked loads fill the padding with zeros).
- ``cast``: the fp32 → 16-bit store conversion, rounding to nearest even under the interpreter too.
- ``TL_DTYPES``: torch → Triton element types the kernels accept.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from mbf.kernels import interpreting

__all__ = ["TL_DTYPES", "cast", "device_of", "dot", "dot_flags", "interpreting", "pad_rank", "tile_ids"]

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MIN_DOT = 16  # smallest dimension tl.dot takes


def pad_rank(r: int) -> int:
    """The rank as the kernels tile it: a power of two ≥ 16."""
    return max(MIN_DOT, triton.next_power_of_2(r))


def dot_flags(t: torch.Tensor) -> dict:
    """The ``UPCAST`` and ``PRECISION`` constexprs of ``dot`` for operands living like ``t``."""
    tf32 = t.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": interpreting(), "PRECISION": "tf32" if tf32 else "ieee"}


def device_of(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (a no-op on CPU / the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32 (see the module docstring for the two flags)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


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

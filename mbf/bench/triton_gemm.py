"""The fused kernel's base GEMM alone: ``y = x W0ᵀ`` in Triton, nothing of LoRA.

Tiles, warps and stages come from the fused forward kernel's own autotune table
(``mbf.kernels.lora_configs``, the ``linear`` kernel, pruned to M's bucket the same way), the tile
order and the dot from ``mbf.kernels._common``. Timed beside cuBLAS (the ``floor`` forward) it
gives the main loop's gap to cuBLAS; the fused forward minus this row is what the LoRA part costs
inside the fused kernel. A benchmark instrument, not a path of the package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbf.kernels._common import cast, dot, interpreting, tile_ids
from mbf.kernels.lora_configs import CANDIDATES, m_range

__all__ = ["triton_gemm"]


def _prune(configs, nargs, **kwargs):
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
    table = CANDIDATES["linear"][nargs["x_ptr"].element_size()]
    lo, hi = m_range(kwargs.get("m_bucket", nargs.get("m_bucket")))
    kept = [c for c in table if lo <= c.kwargs["BLOCK_M"] <= hi]
    return kept or table[-2:]


@triton.autotune(
    [c for size in (2, 4) for c in CANDIDATES["linear"][size]],
    key=["m_bucket", "N", "K"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M", "m_bucket"])
def _gemm_kernel(
    x_ptr,  # (M, K) row-major
    w_ptr,  # (N, K) row-major: W0
    y_ptr,  # (M, N) row-major
    M,  # rows of x
    N,  # rows of W0
    K,  # the reduction
    m_bucket,  # M rounded up to a power of two (the autotune key)
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # M tiles per L2-friendly group
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], (rm[:, None] < M) & (kk[None, :] < K), 0.0
        )
        b = tl.load(
            w_ptr + rn[None, :].to(tl.int64) * K + kk[:, None], (rn[None, :] < N) & (kk[:, None] < K), 0.0
        )
        acc = dot(a, b, acc, UPCAST, "tf32")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(
        y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], cast(acc, y_ptr.dtype.element_ty, UPCAST), mask
    )


def triton_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a contiguous ``x (M, K)`` and ``weight (N, K)`` of one dtype."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    m_bucket = 1 << max(0, M - 1).bit_length()
    _gemm_kernel[grid](x, weight.contiguous(), y, M, N, K, m_bucket, UPCAST=interpreting())
    return y

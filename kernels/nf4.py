"""NF4 base GEMMs of the QLoRA linear: dequantise 4-bit tiles in registers, or once for cuBLAS.

W ``(N, K)`` = ``(out, in)`` is stored as bitsandbytes stores it: byte ``j`` of ``packed`` holds the
codes of flat elements ``2j`` (high nibble) and ``2j + 1`` (low nibble), flat index ``n·K + k``;
``scales[b]`` is the fp32 absmax of flat block ``b`` of 64 elements (the caller expands the double
quantised absmax: ``mbf.quant.NF4Weight.block_scales``). Element-wise

    W[n, k] = code[nibble(n·K + k)] · scales[(n·K + k) // 64]     (fp32 multiply, then the cast)

and K is a multiple of 64, so a row starts on a byte and a block, and byte ``(n·K + k) // 2`` is
``n·K/2 + k//2``. Kernels:

- ``_nf4_dequant_kernel``: one pass, packed → dense ``(N, K)`` in the compute dtype (feeds cuBLAS).
- ``_nf4_lora_fwd_kernel``: ``Y = X Wᵀ + b + s · S B_effᵀ`` with ``B_eff = B_m + λ (B − B_m)``; W tiles
  are dequantised in registers, the LoRA term joins the same fp32 accumulator.
- ``_nf4_lora_dx_kernel``: ``dX = dY W + s · dS A``, same tile loader, reduction over N.

Which one runs (``choose_path``): fused when the token count M is small (the GEMM is bound by
reading W, and reading 0.52 instead of 2 bytes per weight is the win); dequant + cuBLAS when M is
large (the fused kernel re-dequantises each W tile once per M-tile, i.e. M/BLOCK_M times, while the
dequant pass costs one read of W whatever M is, and cuBLAS beats a Triton GEMM at large M).
The threshold ``FUSED_MAX_M`` is PROVISIONAL AND UNMEASURED: it was set without a GPU, from the
argument above; ``bench/test_bench_nf4.py`` measures both paths and is where it must come from.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["FUSED_MAX_M", "choose_path", "nf4_dequantize", "nf4_lora_dx", "nf4_lora_forward"]

# Tokens per call up to which the fused kernel is used; above it, one dequant pass + cuBLAS.
# PROVISIONAL, UNMEASURED (no GPU when written): replace with the crossover from the benchmark.
FUSED_MAX_M = 1024
QBLOCK = 64  # elements per absmax block (bitsandbytes blocksize)
_QBYTES: tl.constexpr = tl.constexpr(QBLOCK // 2)  # bytes per absmax block, for the kernels


def _interpreting() -> bool:
    # Decided at launch, not import: the interpreter's tl.dot multiplies bf16 bit patterns as
    # integers (Triton 3.9), so under TRITON_INTERPRET=1 the tiles are upcast to fp32 first.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gemm_config(M: int, N: int, K: int) -> dict:
    """Tile sizes (one place; keyed on shape). Fixed, not autotuned: nothing was measured yet."""
    if _interpreting():  # small tiles: the interpreter's cost grows with the tile volume
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    block_m = 64 if M <= 64 else 128
    warps = 8 if block_m == 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=3)


def choose_path(M: int, N: int, K: int) -> str:
    """``"fused"`` or ``"dequant"`` for a GEMM of M tokens over an ``(N, K)`` NF4 weight."""
    return "fused" if M <= FUSED_MAX_M else "dequant"


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program from a 1-D grid, GROUP_M row tiles at a time (L2 reuse of W)."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % size_m, (pid % (GROUP_M * num_n)) // size_m


@triton.jit
def _load_w_tile(
    packed_ptr,  # uint8 codes, two per byte, high nibble first
    scales_ptr,  # fp32 absmax per 64-element block
    code_ptr,  # fp32 (16,) NF4 table
    offs_n,  # (BLOCK_N,) rows of W
    k0,  # first column of the tile (a multiple of BLOCK_K, itself a multiple of 64)
    N,
    K,
    BLOCK_K: tl.constexpr,
):
    """``W[offs_n, k0 : k0 + BLOCK_K]`` as an fp32 ``(BLOCK_N, BLOCK_K)`` tile (zeros out of range)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns of the tile
    byte_idx = offs_n[:, None] * (K // 2) + offs_b[None, :]  # (BLOCK_N, BLOCK_K // 2)
    mask = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
    byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + byte_idx // _QBYTES, mask=mask, other=0.0)  # 32 bytes per block
    hi = tl.load(code_ptr + (byte >> 4)) * scale  # the FIRST element of the pair
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    return tl.interleave(hi, lo)  # (BLOCK_N, BLOCK_K): hi at even k, lo at odd k


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:  # fp32 tiles: the interpreter's bf16 tl.dot is wrong (see _interpreting)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:  # true fp32, as torch's matmul (TF32 off by default), not tl.dot's TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 → ``dtype`` rounding to nearest even, as CUDA's cvt.rn and torch's ``.to`` do."""
    if INTERPRET and dtype == tl.bfloat16:
        # the interpreter truncates fp32 → bf16: round the fp32 bits ourselves (then the cast is exact)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # uint8 (n/2,)
    scales_ptr,  # fp32 (n/64,)
    code_ptr,  # fp32 (16,)
    out_ptr,  # (n,) in the compute dtype
    n_bytes,  # n / 2
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,  # bytes per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + offs // _QBYTES, mask=mask, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    w = tl.interleave(hi, lo)  # (2·BLOCK,) in flat order
    offs_out = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs_out, _cast(w, out_ptr.dtype.element_ty, INTERPRET), mask=offs_out < 2 * n_bytes)


@triton.jit
def _nf4_lora_fwd_kernel(
    x_ptr,  # (M, K) activations
    packed_ptr,  # NF4 codes of W (N, K)
    scales_ptr,  # fp32 absmax per 64-block of W
    code_ptr,  # fp32 NF4 table
    bias_ptr,  # (N,) or a dummy when not HAS_BIAS
    s_ptr,  # (M, R) S = drop(x) Aᵀ, x's dtype
    b_ptr,  # (N, R) fine-tuned B
    bm_ptr,  # (N, R) merged B, or a dummy when not HAS_MERGED
    y_ptr,  # (M, N) output
    M,
    N,
    K,
    R,
    stride_xm,  # elements to step one row of x (its column stride is 1)
    stride_sm,  # one row of S
    stride_bn,  # one row of B and of B_m (both contiguous (N, R))
    stride_ym,  # one row of y
    scaling,  # s = alpha / r: runtime, no recompile
    lam,  # λ of B_eff: runtime
    HAS_BIAS: tl.constexpr,
    HAS_MERGED: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K),
            other=0.0,
        )
        w = _load_w_tile(packed_ptr, scales_ptr, code_ptr, offs_n, k0, N, K, BLOCK_K)  # fp32 (BN, BK)
        acc = _dot(
            x, tl.trans(_cast(w, dt, INTERPRET)), acc, INTERPRET
        )  # w cast to x's dtype as the dequant path does
    # the LoRA term joins the same accumulator: s · S B_effᵀ
    offs_r = tl.arange(0, BLOCK_R)
    S = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
        other=0.0,
    )
    b_mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
    b_off = offs_n[:, None] * stride_bn + offs_r[None, :]
    B = tl.load(b_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
    if HAS_MERGED:
        Bm = tl.load(bm_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
        B = Bm + lam * (B - Bm)
    lora = _dot(
        S, tl.trans(_cast(B, dt, INTERPRET)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET
    )
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        _cast(acc, y_ptr.dtype.element_ty, INTERPRET),
        mask=y_mask,
    )


@triton.jit
def _nf4_lora_dx_kernel(
    dy_ptr,  # (M, N) upstream gradient
    packed_ptr,  # NF4 codes of W (N, K)
    scales_ptr,  # fp32 absmax per 64-block of W
    code_ptr,  # fp32 NF4 table
    ds_ptr,  # (M, R) dS = dY B_eff, or a dummy when not HAS_LORA
    a_ptr,  # (R, K) A, contiguous
    dx_ptr,  # (M, K) output
    M,
    N,
    K,
    R,
    stride_dym,  # one row of dY
    stride_dsm,  # one row of dS
    stride_dxm,  # one row of dX
    scaling,  # s: runtime
    HAS_LORA: tl.constexpr,  # False with dropout: the masked LoRA term is added by the caller
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    dt = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + (n0 + offs_n)[None, :],
            mask=(offs_m[:, None] < M) & ((n0 + offs_n)[None, :] < N),
            other=0.0,
        )
        w = _load_w_tile(packed_ptr, scales_ptr, code_ptr, n0 + offs_n, pid_k * BLOCK_K, N, K, BLOCK_K)
        acc = _dot(dy, _cast(w, dt, INTERPRET), acc, INTERPRET)  # (BM, BN) @ (BN, BK)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        dS = tl.load(
            ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :],
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
            other=0.0,
        )
        A = tl.load(
            a_ptr + offs_r[:, None] * K + offs_k[None, :],
            mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
            other=0.0,
        )
        lora = _dot(dS, A, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INTERPRET)
        acc += scaling * lora
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :],
        _cast(acc, dx_ptr.dtype.element_ty, INTERPRET),
        mask=dx_mask,
    )


def _check_nf4(
    packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, shape: tuple[int, int]
) -> None:
    N, K = shape
    if K % QBLOCK:
        raise ValueError(f"NF4 weight in_features {K} must be a multiple of {QBLOCK}")
    if packed.dtype != torch.uint8 or packed.numel() != N * K // 2:
        raise ValueError(
            f"packed NF4 codes must be uint8 with {N * K // 2} bytes, got {packed.dtype} {packed.numel()}"
        )
    if scales.dtype != torch.float32 or scales.numel() != N * K // QBLOCK:
        raise ValueError(
            f"NF4 scales must be fp32 with {N * K // QBLOCK} blocks, got {scales.dtype} {scales.numel()}"
        )
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError("the NF4 code table must be 16 fp32 values")
    if N * K >= 2**31:  # the kernels index with int32
        raise ValueError(f"NF4 weight of {N}x{K} elements exceeds the kernels' int32 indexing")


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension ≥ 16


def nf4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Dense ``(N, K)`` W in ``dtype`` from its NF4 storage: one pass, bit-exact to bitsandbytes."""
    _check_nf4(packed, scales, code, shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    BLOCK = 1024
    _nf4_dequant_kernel[(triton.cdiv(n_bytes, BLOCK),)](
        packed, scales, code, out, n_bytes, INTERPRET=_interpreting(), BLOCK=BLOCK
    )
    return out


def nf4_lora_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    S: torch.Tensor,
    B: torch.Tensor,
    merged_B: torch.Tensor | None,
    scaling: float,
    lam: float,
) -> torch.Tensor:
    """``x Wᵀ + b + s · S B_effᵀ``: x ``(M, K)``, S ``(M, r)``, B and B_m ``(N, r)`` → ``(M, N)``."""
    _check_nf4(packed, scales, code, shape)
    N, K = shape
    M, r = x.shape[0], S.shape[1]
    if x.shape[1] != K or S.shape[0] != M or B.shape != (N, r):
        raise ValueError(
            f"x {tuple(x.shape)}, S {tuple(S.shape)}, B {tuple(B.shape)} do not fit W ({N}, {K})"
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    S, B = S.to(x.dtype).contiguous(), B.contiguous()
    Bm = B if merged_B is None else merged_B.to(B.dtype).contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = _gemm_config(M, N, K)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _nf4_lora_fwd_kernel[grid](
        x,
        packed,
        scales,
        code,
        bias if bias is not None else y,
        S,
        B,
        Bm,
        y,
        M,
        N,
        K,
        r,
        x.stride(0),
        S.stride(0),
        B.stride(0),
        y.stride(0),
        float(scaling),
        float(lam),
        HAS_BIAS=bias is not None,
        HAS_MERGED=merged_B is not None,
        INTERPRET=_interpreting(),
        BLOCK_R=_block_r(r),
        **cfg,
    )
    return y


def nf4_lora_dx(
    dy: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    dS: torch.Tensor | None,
    A: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``dY W + s · dS A`` (``dS None``: ``dY W`` only) for ``dY (M, N)``, ``A (r, K)``: ``(M, K)``."""
    _check_nf4(packed, scales, code, shape)
    N, K = shape
    M, r = dy.shape[0], A.shape[0]
    if dy.shape[1] != N or A.shape[1] != K or (dS is not None and dS.shape != (M, r)):
        raise ValueError(f"dY {tuple(dy.shape)}, A {tuple(A.shape)} do not fit W ({N}, {K})")
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    A = A.to(dy.dtype).contiguous()
    dS = None if dS is None else dS.to(dy.dtype).contiguous()
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    cfg = _gemm_config(M, K, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    _nf4_lora_dx_kernel[grid](
        dy,
        packed,
        scales,
        code,
        dS if dS is not None else dy,
        A,
        dx,
        M,
        N,
        K,
        r,
        dy.stride(0),
        dS.stride(0) if dS is not None else 0,
        dx.stride(0),
        float(scaling),
        HAS_LORA=dS is not None,
        INTERPRET=_interpreting(),
        BLOCK_R=_block_r(r),
        **cfg,
    )
    return dx

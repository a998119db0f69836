"""The tile-level pieces of the fused LoRA kernels (``lora.py``): ``@triton.jit`` helpers only.

- ``keep_factor``: the Philox dropout keep factor of a tile (``mbf.reference.dropout_keep_mask``'s bits);
- ``load_b_eff``: a tile of ``B_eff = B_m + λ (B − B_m)`` in fp32;
- ``split_range``: a program's share of a reduction dealt over the grid's second axis (down, dy);
- ``da_prologue``, ``lora_addend``, ``gemm_loop``: the three parts of ``_lora_linear_kernel`` (the dA
  accumulation, the policy's LoRA addend, the base GEMM's main loop).
"""

import triton
import triton.language as tl

from mbf.kernels._common import cast, dot

__all__ = ["da_prologue", "gemm_loop", "keep_factor", "load_b_eff", "lora_addend", "split_range"]


@triton.jit
def keep_factor(
    seed,  # dropout seed (int64, loaded from the policy's key tensor)
    threshold,  # Philox draws below it drop their element (int64 holding a uint32)
    offs_m,  # (BLOCK_M,) rows of the tile
    k0,  # first column of the tile: a multiple of 4
    n_cols,  # columns of the whole (M, n_cols) input
    BLOCK_K: tl.constexpr,  # columns of the tile
    dtype: tl.constexpr,  # dtype of the returned factor (that of the tile it multiplies)
    UPCAST: tl.constexpr,  # interpreter: an fp32 factor (it multiplies 16-bit floats as bit patterns)
):
    """0/1 keep factor of the ``(BLOCK_M, BLOCK_K)`` tile at columns ``k0 + [0, BLOCK_K)``."""
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # one Philox counter per 4 columns
    counters = offs_m.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + quads[None, :]  # int64: M·K/4 > 2³¹
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4j + i <- r_i[j]
    keep = bits >= threshold.to(tl.uint32)
    if UPCAST:
        return keep.to(tl.float32)
    return keep.to(dtype)


@triton.jit
def load_b_eff(b_ptrs, bm_ptrs, mask, lam, HAS_MERGED: tl.constexpr):
    """A tile of B_eff = B_m + λ (B − B_m) in fp32 (B alone without a merged B)."""
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MERGED:
        bm = tl.load(bm_ptrs, mask=mask, other=0.0).to(tl.float32)
        b = bm + lam * (b - bm)
    return b


@triton.jit
def split_range(length, BLOCK: tl.constexpr):
    """``[lo, hi)``: this program's share of a reduction over ``length``, in whole BLOCK steps dealt
    evenly over the grid's second axis (``lora_configs.split_count``); empty for a program past the end."""
    per = tl.cdiv(tl.cdiv(length, BLOCK), tl.num_programs(1))
    lo = tl.minimum(tl.program_id(1) * per * BLOCK, length)
    return lo, tl.minimum(length, lo + per * BLOCK)


@triton.jit
def da_prologue(
    down_ptrs,  # (BLOCK_M, 1) row pointers into dS
    stride_downr,  # elements to step one column of dS
    x_tile,  # (BLOCK_M, BLOCK_N) x at this (m, n), dropped, in the base dtype
    da_ptr,  # (R, N) contiguous fp32 dA accumulator
    offs_n,  # (BLOCK_N,) columns of the tile
    m_ok,  # (BLOCK_M,) rows in range
    n_ok,  # (BLOCK_N,) columns in range
    N,  # columns of dA
    R,  # rank
    da_scale,  # s / (1 - p)
    ldt: tl.constexpr,  # the LoRA compute dtype (dS is rounded to it)
    R_PAD: tl.constexpr,  # rank padded
    R_CHUNK: tl.constexpr,  # ranks per step
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """``dA[:, n-tile] += da_scale · dSᵀ drop(x)`` for this M tile, rank chunk by rank chunk (atomics:
    an order-free sum over the M tiles). The x tile of the dX GEMM's (m, n) is exactly dA's; it stays
    16-bit against fp32 dS (``dot`` keeps the products fp32-class)."""
    for r0 in tl.static_range(0, R_PAD, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < R
        ds_ok = m_ok[:, None] & r_ok[None, :]
        ds = tl.load(down_ptrs + offs_r[None, :] * stride_downr, mask=ds_ok, other=0.0)
        da = tl.zeros((R_CHUNK, x_tile.shape[1]), dtype=tl.float32)
        da = dot(tl.trans(cast(ds, ldt, UPCAST)), x_tile, da, UPCAST, PRECISION)
        tl.atomic_add(da_ptr + offs_r[:, None] * N + offs_n[None, :], da * da_scale,
                      mask=r_ok[:, None] & n_ok[None, :], sem="relaxed")  # fmt: skip


@triton.jit
def lora_addend(
    down_ptrs,  # (BLOCK_M, 1) row pointers into the token-side factor: S (forward) or dS (dX)
    stride_downr,  # elements to step one of its columns
    up_ptr,  # the other factor read as (R, N): B_effᵀ (forward) or A (dX)
    upm_ptr,  # the merged B read like it, if HAS_MERGED
    stride_upr,  # elements to step one of its rows
    stride_upn,  # elements to step one of its columns
    cols,  # (1, BLOCK_N) int64 columns of the tile
    bias_ptr,  # (N,) bias, if HAS_BIAS
    offs_n,  # (BLOCK_N,) columns of the tile
    m_ok,  # (BLOCK_M,) rows in range
    n_ok,  # (BLOCK_N,) columns in range
    R,  # rank
    scale,  # s (forward) or s / (1 - p) (dX)
    lam,  # λ of B_eff
    keep,  # (BLOCK_M, BLOCK_N) 0/1 dropout factor, if HAS_DROPOUT
    dt: tl.constexpr,  # the output's (base) dtype
    ldt: tl.constexpr,  # the LoRA compute dtype
    HAS_BIAS: tl.constexpr,  # add the bias
    HAS_MERGED: tl.constexpr,  # form B_eff from up and upm with λ
    HAS_DROPOUT: tl.constexpr,  # mask the term
    R_PAD: tl.constexpr,  # rank padded
    R_CHUNK: tl.constexpr,  # ranks per step
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_N: tl.constexpr,  # tile columns
    UPCAST: tl.constexpr,  # interpreter: dot in fp32 (and rounding casts)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """The policy's addend ``round(b + round(down) round(scale · up)) ⊙ keep`` as an fp32 tile: operands
    rounded to the output dtype (a 16-bit MMA over a 16-bit base), the sum rounded once to it."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.static_range(0, R_PAD, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        r_ok = offs_r < R
        d_ok = m_ok[:, None] & r_ok[None, :]
        d = tl.load(down_ptrs + offs_r[None, :] * stride_downr, mask=d_ok, other=0.0)
        d = cast(cast(d, ldt, UPCAST).to(tl.float32), dt, UPCAST)  # S (dS) in the compute dtype, then dt
        u_off = offs_r[:, None] * stride_upr + cols * stride_upn
        u = load_b_eff(up_ptr + u_off, upm_ptr + u_off, r_ok[:, None] & n_ok[None, :], lam, HAS_MERGED)
        u = cast(scale * cast(u, ldt, UPCAST).to(tl.float32), dt, UPCAST)  # s · B_eff (s' · A) in dt
        acc = dot(d, u, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = cast(acc, dt, UPCAST).to(tl.float32)
    if HAS_DROPOUT:
        acc = acc * keep
    return acc


@triton.jit
def gemm_loop(
    acc,  # (BLOCK_M, BLOCK_N) fp32 accumulator to add into
    lhs_ptrs,  # (BLOCK_M, 1) row pointers into the left operand (x or dY)
    stride_lhsk,  # elements to step one of its columns
    w_ptrs,  # (1, BLOCK_N) column pointers into W0 read as (K, N)
    stride_wk,  # elements to step one row of it
    m_ok,  # (BLOCK_M,) rows in range
    n_ok,  # (BLOCK_N,) columns in range
    K,  # reduction length
    BLOCK_K: tl.constexpr,  # reduction step
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """``acc + lhs @ W`` over K: the base GEMM's main loop, carrying the accumulator alone."""
    offs_k = tl.arange(0, BLOCK_K)
    lhs_ptrs = lhs_ptrs + offs_k[None, :] * stride_lhsk
    w_ptrs = w_ptrs + offs_k.to(tl.int64)[:, None] * stride_wk
    dt = lhs_ptrs.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(lhs_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(dt)
        acc = dot(a, w, acc, UPCAST, PRECISION)
        lhs_ptrs += BLOCK_K * stride_lhsk
        w_ptrs += BLOCK_K * stride_wk
    return acc

"""Fused LoRA linear kernels, the time-aware merge inside: two launches forward, two or three backward.

The autotune configs are in ``lora_configs.py``; the launchers and the ``torch.library`` op in
``lora_op.py``.

With x flattened to ``(M, K)``, ``W0: (N, K)``, ``A: (r, K)``, ``B`` and ``B_m: (N, r)``::

    B_eff = B_m + λ (B − B_m)          (B alone when there is no merged B; formed in-kernel, fp32)
    S     = drop(x) Aᵀ                 (M, r)  launch 1: one pass over x (+ a sum of its parts)
    y     = x W0ᵀ + b + s · S B_effᵀ   (M, N)  launch 2: the LoRA term joins the GEMM's fp32 accumulator

    dS    = dY B_eff                   (M, r)  launch 3: one pass over dY gives dS (+ a sum) and
    dB    = s · λ · dYᵀ S              (N, r)           dB (λ only when the merged B is in play)
    dX    = dY W0 + s · drop(dS A)     (M, K)  launch 4: one GEMM with the LoRA term joined, whose
    dA    = s · dSᵀ drop(x)            (r, K)           prologue reads the x tile at the same (m, k)

Launches 1 and 3 are memory-bound passes with one row tile per program: at small M the row tiles
alone cannot fill a GPU, so each row tile's reduction (K for S, N for dS) is shared by the programs
of the grid's second axis (``lora_configs.split_count``: row tiles x parts reach two programs per
SM), each writing its part of S or dS, which the launcher then sums in a fixed order (no atomics:
the forward stays deterministic). The dY pass starts each row tile's sweep at a step of its own
(wrapping around), so the row tiles add into different dB rows at once.

The prologue caps dX's tile at the 128×128 class (``lora_configs.linear_budget``: at 128×256 it
spills). Without dropout (whose mask alone caps the tile too), and where M is large enough for the
wider tiles to fill the GPU, dA gets a launch of its own: the same kernel without its main GEMM
(one more pass over x and dS), and dX may take the 128×256 tile (``route.da_apart``).

dA and dB are sums over the M tiles, added with fp32 atomics in any order, while the padded rank
is at most ``route.FUSE_MAX_R_PAD`` (32; ``route.atomic_grads``); dB's accumulator rows are R_PAD
apart (the padding columns add zeros) so that on sm_90 each tile goes out as 128-bit vector atomics
(``red.add.v4.f32``; sm_80 has scalar fp32 atomics only). Above it, and under
``torch.use_deterministic_algorithms(True)``, the launcher turns them off in launches 3 and 4 and
runs ``_lora_wgrad_kernel`` twice: one program per column tile sweeps all of M in a fixed order
(one more pass over x and over dY, no atomics, the same bits every run).

Dropout: ``drop(z)[m, k] = z[m, k] · keep[m, k] / (1 − p)``, with one Philox-4x32 call per four
columns: ``keep[m, k] = philox4x(seed, m · ⌈K/4⌉ + ⌊k/4⌋)[k mod 4] ≥ floor(p · 2³²)``, exactly
``mbf.reference.dropout_keep_mask``. The mask is regenerated from the seed wherever it is needed and
never stored; it travels as a 0/1 factor in the compute dtype, which Triton can move between the
layouts of its two consumers (an i1 tile cannot pass through shared memory).

Precision (the policy of ``mbf.kernels.policy``): the base GEMM runs in x's dtype, the LoRA branch
in the adapter's (read from the adapter pointer), fp32 accumulation everywhere, cast at the store.
The LoRA term of y and dX is the GEMM's addend: formed before the K loop from operands rounded to
the output dtype (a 16-bit MMA over a 16-bit base), plus the bias, rounded once to the output dtype,
masked; the K loop then adds the base product to it. S, dS, dA and dB keep the adapter's dtype:
fp32 adapters over a 16-bit base multiply 16-bit tiles (x, dY) by fp32 ones fp32-class
(``_common.dot``). Saved for backward: x and S.

s, λ, p and the seed (loaded from a 0-d int64 tensor: no host sync) are runtime arguments; only
whether a bias / merged B / dropout exists is a constexpr, so a new task or a new λ never
recompiles. Arguments equal to the rank (R and the strides over it) and M are not specialised by
Triton either: ranks 8 and 16 share one binary, as do all token counts. Row offsets (and column
offsets with a non-unit stride) are int64, since M·K and N·K may pass 2³¹; the launcher keeps every
per-step pointer increment inside int32.
"""

import triton
import triton.language as tl

from mbf.kernels._common import cast, dot, tile_ids
from mbf.kernels.lora_configs import autotune
from mbf.kernels.lora_tiles import da_prologue, gemm_loop, keep_factor, load_b_eff, lora_addend, split_range

__all__ = ["down", "dy", "keep_mask", "linear", "wgrad"]


@triton.jit
def _keep_mask_kernel(
    out_ptr,  # (M, K) contiguous bool output
    M,  # rows
    K,  # columns
    seed_ptr,  # () int64 Philox key
    threshold: tl.int64,  # uint32 Philox draws below it drop their element
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program (a multiple of 4)
):
    """The keep mask written out (the torch paths on a GPU keep it for their backward)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    keep = keep_factor(tl.load(seed_ptr), threshold, offs_m, k0, K, BLOCK_K, tl.int8, False)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep != 0, mask=mask)


@triton.jit(do_not_specialize=["M", "R", "stride_sp", "stride_sm", "threshold", "m_bucket"])
def _lora_down_kernel(
    x_ptr,  # (M, K) layer input
    a_ptr,  # (R, K) lora_A, in the LoRA compute dtype
    s_ptr,  # (P, M, R) fp32 output: S = drop(x) Aᵀ summed over the P programs sharing a row tile's K
    M,  # rows of x (tokens)
    K,  # in features
    R,  # rank
    stride_xm,  # elements to step one row of x
    stride_xk,  # elements to step one column of x
    stride_ar,  # ... one row of A
    stride_ak,  # ... one column of A
    stride_sp,  # ... one part of S (the grid's second axis)
    stride_sm,  # ... one row of S
    stride_sr,  # ... one column of S
    keep_scale,  # 1 / (1 - p): applied once to the fp32 accumulator instead of to every x element
    seed_ptr,  # () int64 dropout seed (the Philox key), if HAS_DROPOUT
    threshold: tl.int64,  # uint32 Philox draws below it drop their element
    m_bucket,  # next power of two of M: autotune key only
    HAS_DROPOUT: tl.constexpr,  # p > 0
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows of x per program
    BLOCK_K: tl.constexpr,  # features per step of the K loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """Program (m, p) sums its row tile's share ``p`` of the K steps into part p of S (``split_k``)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo, k_hi = split_range(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_ok, r_ok = offs_m < M, offs_r < R
    cols = (k_lo + offs_k).to(tl.int64)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk
    a_ptrs = a_ptr + cols[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (BLOCK_K, R_PAD): Aᵀ
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = x * keep_factor(tl.load(seed_ptr), threshold, offs_m, k0, K, BLOCK_K, x.dtype, UPCAST)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot(x, a, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * keep_scale
    s_ptrs = s_ptr + tl.program_id(1).to(tl.int64) * stride_sp
    s_ptrs += offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "R", "stride_downm", "stride_upn", "threshold", "m_bucket"])
def _lora_linear_kernel(
    lhs_ptr,  # (M, K) the GEMM's left operand: x (forward) or dY (dX)
    w_ptr,  # W0 read as (K, N) through its strides: W0ᵀ (forward) or W0 (dX)
    bias_ptr,  # (N,) bias, if HAS_BIAS
    down_ptr,  # (M, R) fp32 token-side LoRA factor: S (forward) or dS (dX)
    up_ptr,  # the other LoRA factor read as (R, N) through its strides: Bᵀ (forward) or A (dX)
    upm_ptr,  # merged B read like up (same strides), if HAS_MERGED
    x_ptr,  # (M, N) layer input for the dA prologue, if ACC_DA
    da_ptr,  # (R, N) contiguous fp32 dA accumulator (atomic adds over M tiles), if ACC_DA
    out_ptr,  # (M, N) output: y or dX, if HAS_MAIN
    M,  # rows (tokens)
    N,  # output columns: out features (forward) or in features (dX)
    K,  # reduction length: in features (forward) or out features (dX)
    R,  # rank
    stride_lhsm,  # elements to step one row of lhs
    stride_lhsk,  # ... one column of lhs
    stride_wk,  # ... one row of W0 read as (K, N)
    stride_wn,  # ... one column of it
    stride_downm,  # ... one row of the token-side factor
    stride_downr,  # ... one column of it
    stride_upr,  # ... one row of the other factor read as (R, N)
    stride_upn,  # ... one column of it
    stride_xm,  # ... one row of x
    stride_xn,  # ... one column of x
    stride_outm,  # ... one row of the output
    stride_outn,  # ... one column of the output
    lora_scale,  # s forward; s / (1 - p) for dX
    lam,  # λ of B_eff
    da_scale,  # s / (1 - p)
    seed_ptr,  # () int64 dropout seed, as in _lora_down_kernel (the mask is over the (M, N) tile of x)
    threshold: tl.int64,  # uint32 Philox draws below it drop their element
    m_bucket,  # autotune key only
    HAS_MAIN: tl.constexpr,  # compute the GEMM and store out (False: only the dA prologue)
    HAS_BIAS: tl.constexpr,  # add the bias (forward)
    HAS_MERGED: tl.constexpr,  # form B_eff from up and upm with λ (forward)
    HAS_DROPOUT: tl.constexpr,  # p > 0: mask the LoRA term and x (dX, dA)
    ACC_DA: tl.constexpr,  # accumulate dA = da_scale · downᵀ drop(x) into da_ptr
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # M tiles per L2-friendly group
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """``out = lhs @ W + addend`` (forward: y; backward: dX, with dA accumulated in the prologue, or dA
    alone without HAS_MAIN).

    The prologue (dA) and the addend come BEFORE the K loop, so that their operands (the mask, the x
    tile, (BLOCK, R) tiles) are dead when the loop starts: it carries the accumulator alone (after
    it they sat on top of it: 255 registers, spills on sm_90).
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]  # int64: N·K may pass 2³¹
    dt = lhs_ptr.dtype.element_ty  # the base GEMM's dtype
    R_CHUNK: tl.constexpr = 32 if R_PAD > 32 else R_PAD
    down_ptrs = down_ptr + rows * stride_downm
    if ACC_DA:
        x_tile = tl.load(x_ptr + rows * stride_xm + cols * stride_xn, mask=m_ok[:, None] & n_ok[None, :],
                         other=0.0).to(dt)  # fmt: skip
        if HAS_DROPOUT:
            n0 = pid_n * BLOCK_N
            x_tile = x_tile * keep_factor(tl.load(seed_ptr), threshold, offs_m, n0, N, BLOCK_N, dt, UPCAST)
        da_prologue(down_ptrs, stride_downr, x_tile, da_ptr, offs_n, m_ok, n_ok, N, R, da_scale,
                     up_ptr.dtype.element_ty, R_PAD, R_CHUNK, UPCAST, PRECISION)  # fmt: skip
    if HAS_MAIN:
        # the mask again, not held across the prologue: a few ALU ops per element against ~30 registers
        keep = 0.0
        if HAS_DROPOUT:
            keep = keep_factor(tl.load(seed_ptr), threshold, offs_m, pid_n * BLOCK_N, N, BLOCK_N, dt, UPCAST)
        ldt = up_ptr.dtype.element_ty  # the LoRA compute dtype
        acc = lora_addend(down_ptrs, stride_downr, up_ptr, upm_ptr, stride_upr, stride_upn, cols,
                           bias_ptr, offs_n, m_ok, n_ok, R, lora_scale, lam, keep, dt, ldt, HAS_BIAS,
                           HAS_MERGED, HAS_DROPOUT, R_PAD, R_CHUNK, BLOCK_M, BLOCK_N, UPCAST,
                           PRECISION)  # fmt: skip
        lhs_ptrs, w_ptrs = lhs_ptr + rows * stride_lhsm, w_ptr + cols * stride_wn
        acc = gemm_loop(acc, lhs_ptrs, stride_lhsk, w_ptrs, stride_wk, m_ok, n_ok, K, BLOCK_K, UPCAST,
                         PRECISION)  # fmt: skip
        out = out_ptr + rows * stride_outm + cols * stride_outn
        tl.store(out, cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "R", "stride_bn", "stride_dsp", "stride_sm", "m_bucket"])
def _lora_dy_kernel(
    dy_ptr,  # (M, N) upstream gradient
    b_ptr,  # (N, R) lora_B, in the LoRA compute dtype
    bm_ptr,  # (N, R) merged B (same strides as B), if HAS_MERGED
    s_ptr,  # (M, R) fp32 S saved by the forward, if ACC_DB
    ds_ptr,  # (P, M, R) fp32 output: dS = dY B_eff summed over the P programs sharing a row tile's N
    db_ptr,  # (N, R_PAD) contiguous fp32 dB accumulator (atomic adds over M tiles), if ACC_DB
    M,  # rows (tokens)
    N,  # out features
    R,  # rank
    stride_dym,  # elements to step one row of dY
    stride_dyn,  # ... one column of dY
    stride_bn,  # ... one row of B (and of the merged B)
    stride_br,  # ... one column of B
    stride_dsp,  # ... one part of dS (the grid's second axis)
    stride_sm,  # ... one row of S and of each part of dS
    stride_sr,  # ... one column of S and of each part of dS
    lam,  # λ of B_eff
    db_scale,  # s · λ with a merged B, s without
    m_bucket,  # autotune key only
    HAS_MERGED: tl.constexpr,  # form B_eff from B and B_m with λ
    ACC_DB: tl.constexpr,  # accumulate dB (B needs a gradient and atomics are allowed)
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16: also dB's row stride
    BLOCK_M: tl.constexpr,  # rows of dY per program
    BLOCK_N: tl.constexpr,  # columns per step of the N loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """Program (m, p) sweeps its row tile's share ``p`` of the N steps (``split_range``), starting at
    step ``m mod steps`` and wrapping around: the row tiles' dB atomics land on different rows at once.
    dB rows are R_PAD apart (the padding columns add zeros), so each (BLOCK_N, R_PAD) tile goes out as
    vector atomics over whole rows on sm_90, not one scalar per element."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_lo, n_hi = split_range(N, BLOCK_N)
    steps = tl.cdiv(n_hi - n_lo, BLOCK_N)
    first = pid_m % tl.maximum(steps, 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_ok, r_ok = offs_m < M, offs_r < R
    ldt = b_ptr.dtype.element_ty  # the LoRA compute dtype
    s_off = offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    if ACC_DB:
        s_tile = cast(tl.load(s_ptr + s_off, mask=m_ok[:, None] & r_ok[None, :], other=0.0), ldt, UPCAST)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    ds = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for i in range(0, steps):
        n0 = n_lo + ((first + i) % steps) * BLOCK_N
        n_ok = offs_n < N - n0
        dy = tl.load(dy_rows + n0.to(tl.int64) * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b_off = (n0 + offs_n)[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BLOCK_N, R_PAD)
        b_ok = n_ok[:, None] & r_ok[None, :]
        b_eff = load_b_eff(b_ptr + b_off, bm_ptr + b_off, b_ok, lam, HAS_MERGED)
        ds = dot(dy, cast(b_eff, ldt, UPCAST), ds, UPCAST, PRECISION)  # 16-bit dY vs fp32 B: see dot
        if ACC_DB:  # the same dY tile, while it is in registers
            db = dot(tl.trans(dy), s_tile, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), UPCAST, PRECISION)
            db_ptrs = db_ptr + (n0 + offs_n).to(tl.int64)[:, None] * R_PAD + offs_r[None, :]
            tl.atomic_add(db_ptrs, db * db_scale, mask=n_ok[:, None], sem="relaxed")
    ds_ptrs = ds_ptr + tl.program_id(1).to(tl.int64) * stride_dsp + s_off
    tl.store(ds_ptrs, ds, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "R", "stride_leftm", "stride_outc", "threshold"])
def _lora_wgrad_kernel(
    left_ptr,  # (M, R) fp32 left factor: dS (for dA) or S (for dB)
    right_ptr,  # (M, C) right factor: x (for dA) or dY (for dB)
    out_ptr,  # (R, C) output through its strides, in the adapter dtype: dA, or dB (N, R) read as dBᵀ
    M,  # rows (tokens): the reduction
    C,  # columns: in features (dA) or out features (dB)
    R,  # rank
    stride_leftm,  # elements to step one row of the left factor
    stride_leftr,  # ... one column of it
    stride_rightm,  # ... one row of the right factor
    stride_rightc,  # ... one column of it
    stride_outr,  # ... one row of the output as (R, C)
    stride_outc,  # ... one column of it
    scale,  # s / (1 - p) for dA, s · λ for dB
    seed_ptr,  # () int64 dropout seed: the mask over x (dA only)
    threshold: tl.int64,  # uint32 Philox draws below it drop their element
    HAS_DROPOUT: tl.constexpr,  # mask the right factor (dA with p > 0)
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows per step of the M loop
    BLOCK_C: tl.constexpr,  # output columns per program
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """``out = scale · Lᵀ drop(X)``, M swept in one fixed order by one program per column tile."""
    c0 = tl.program_id(0) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    c_ok, r_ok = offs_c < C, offs_r < R
    ldt = out_ptr.dtype.element_ty  # the adapter's dtype
    cols = offs_c.to(tl.int64)[None, :] * stride_rightc
    acc = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + offs_m
        m_ok = rows < M
        lt = tl.load(left_ptr + rows.to(tl.int64)[:, None] * stride_leftm + offs_r[None, :] * stride_leftr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
        lt = cast(lt, ldt, UPCAST)
        x = tl.load(right_ptr + rows.to(tl.int64)[:, None] * stride_rightm + cols,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        if HAS_DROPOUT:
            x = x * keep_factor(tl.load(seed_ptr), threshold, rows, c0, C, BLOCK_C, x.dtype, UPCAST)
        acc = dot(tl.trans(lt), x, acc, UPCAST, PRECISION)
    out_ptrs = out_ptr + offs_r[:, None] * stride_outr + offs_c.to(tl.int64)[None, :] * stride_outc
    tl.store(out_ptrs, cast(acc * scale, ldt, UPCAST), mask=r_ok[:, None] & c_ok[None, :])


# keyed on (M bucket, N, K, r) plus the flags that change the work (the tensors' dtypes join every
# key by themselves); atomically accumulated outputs are zeroed between candidates
down = autotune("down", ["m_bucket", "K", "R_PAD", "HAS_DROPOUT"])(_lora_down_kernel)
linear = autotune(
    "linear", ["m_bucket", "N", "K", "R_PAD", "HAS_MAIN", "ACC_DA", "HAS_DROPOUT"], ["da_ptr"]
)(_lora_linear_kernel)
dy = autotune("dy", ["m_bucket", "N", "R_PAD", "ACC_DB"], ["db_ptr"])(_lora_dy_kernel)
keep_mask = _keep_mask_kernel
wgrad = _lora_wgrad_kernel  # deterministic mode only: one fixed config (lora_configs.wgrad_config)

"""Fused LoRA linear kernels, the time-aware merge inside: two launches forward, two backward.

The launchers and the ``torch.library`` op are in ``lora_op.py``.

With x flattened to ``(M, K)``, ``W0: (N, K)``, ``A: (r, K)``, ``B`` and ``B_m: (N, r)``::

    B_eff = B_m + λ (B − B_m)          (B alone when there is no merged B; formed in-kernel, fp32)
    S     = drop(x) Aᵀ                 (M, r)  launch 1: one pass over x
    y     = x W0ᵀ + b + s · S B_effᵀ   (M, N)  launch 2: the LoRA term joins the GEMM's fp32 accumulator

    dS    = dY B_eff                   (M, r)  launch 3: one pass over dY gives dS and
    dB    = s · λ · dYᵀ S              (N, r)           dB (λ only when the merged B is in play)
    dX    = dY W0 + s · drop(dS A)     (M, K)  launch 4: one GEMM with the LoRA term joined, whose
    dA    = s · dSᵀ drop(x)            (r, K)           epilogue reads the x tile at the same (m, k)

``drop(z)[m, k] = z[m, k] · keep[m, k] / (1 − p)`` with ``keep[m, k] = philox(seed, m·K + k) ≥
floor(p · 2³²)``, exactly ``mbf.reference.dropout_keep_mask``: the mask is regenerated from the seed
wherever it is needed and never stored. Saved for backward: x and S (plus references to the
parameters). s, λ, p and the seed are runtime arguments; only whether a bias / merged B / dropout
exists is a constexpr, so a new task or a new λ never recompiles. fp32 accumulation, cast at the
store. W0, the bias and the merged B are frozen: they never get a gradient.
"""

import triton
import triton.language as tl
from mbf.kernels._common import cast, dot, interpreting, tile_ids

__all__ = ["down", "dy", "linear"]

# ---------------------------------------------------------------------------------------------------
# Constants and autotune configs
# ---------------------------------------------------------------------------------------------------

# One small config per kernel under TRITON_INTERPRET=1: the interpreter runs every program in
# numpy, so autotuning there only costs time; these blocks are small enough that the tests' odd
# shapes still span several tiles and exercise every edge mask.
_INTERPRET_CONFIGS = {
    "down": triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
    "linear": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}),
    "dy": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
}


def _configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates per kernel, pruned by M at launch.

    Starting points, not yet measured here: the GEMM tiles are the Triton matmul tutorial's Hopper
    ones; bench/test_bench_lora.py is where to check them on a GPU.
    """
    if kernel == "linear":  # compute-bound GEMM: the Triton matmul tutorial's best Hopper tiles
        shapes = [
            (128, 256, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (64, 256, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (32, 128, 64, 4, 4),
            (16, 128, 128, 4, 4),
        ]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st
            )
            for bm, bn, bk, w, st in shapes
        ]
    if kernel == "down":  # memory-bound over x: enough rows per program to stream K, enough programs
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4, num_stages=st)
            for bm, bk, st in [(64, 128, 3), (64, 64, 4), (32, 128, 4), (16, 256, 3)]
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=st)  # "dy"
        for bm, bn, st in [(128, 64, 3), (64, 128, 3), (64, 64, 4), (32, 128, 4), (16, 128, 4)]
    ]


def _pruner(kernel: str):
    """early_config_prune: the interpreter's one config, else the configs whose BLOCK_M fits M."""

    def prune(configs, nargs, **kwargs):
        if interpreting():
            return [_INTERPRET_CONFIGS[kernel]]
        m_bucket = {**nargs, **kwargs}["m_bucket"]
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(m_bucket, 16)]
        return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    return prune


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _keep(seed, threshold, offs_m, offs_k, n_cols):
    """Dropout keep-mask of a tile of an (M, n_cols) input: philox(seed, m·n_cols + k) ≥ threshold."""
    offsets = offs_m.to(tl.int64)[:, None] * n_cols + offs_k[None, :]  # int64: M·K may pass 2³¹
    return tl.randint(seed, offsets) >= threshold.to(tl.uint32)


@triton.jit
def _load_b_eff(b_ptrs, bm_ptrs, mask, lam, HAS_MERGED: tl.constexpr):
    """A tile of B_eff = B_m + λ (B − B_m) in fp32 (B alone without a merged B)."""
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MERGED:
        bm = tl.load(bm_ptrs, mask=mask, other=0.0).to(tl.float32)
        b = bm + lam * (b - bm)
    return b


@triton.jit(do_not_specialize=["M", "seed", "threshold"])
def _lora_down_kernel(
    x_ptr,  # (M, K) layer input
    a_ptr,  # (R, K) lora_A
    s_ptr,  # (M, R) fp32 output S = drop(x) Aᵀ
    M,  # rows of x (tokens)
    K,  # in features
    R,  # rank
    stride_xm,  # elements to step one row of x
    stride_xk,  # elements to step one column of x
    stride_ar,  # ... one row of A
    stride_ak,  # ... one column of A
    stride_sm,  # ... one row of S
    stride_sr,  # ... one column of S
    keep_scale,  # 1 / (1 - p): applied once to the fp32 accumulator instead of to every x element
    seed,  # dropout seed
    threshold,  # uint32 Philox draws below it drop their element
    m_bucket,  # next power of two of M: autotune key only
    HAS_DROPOUT: tl.constexpr,  # p > 0
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows of x per program
    BLOCK_K: tl.constexpr,  # features per step of the K loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_ok, r_ok = offs_m < M, offs_r < R
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (BLOCK_K, R_PAD): Aᵀ
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, threshold, offs_m, k0 + offs_k, K), x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(x.dtype)
        acc = dot(x, a, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * keep_scale
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "seed", "threshold"])
def _lora_linear_kernel(
    a_ptr,  # (M, K) main left operand: x (forward) or dY (dX)
    w_ptr,  # main right operand read as (K, N) through its strides: W0ᵀ (forward) or W0 (dX)
    bias_ptr,  # (N,) bias, if HAS_BIAS
    l_ptr,  # (M, R) fp32 LoRA left operand: S (forward) or dS (backward)
    u_ptr,  # LoRA right operand read as (R, N) through its strides: Bᵀ (forward) or A (backward)
    um_ptr,  # merged right operand B_mᵀ (same strides as u), if HAS_MERGED
    x_ptr,  # (M, N) layer input for the dA epilogue, if ACC_DA
    da_ptr,  # (R, N) fp32 dA accumulator (atomic adds over M tiles), if ACC_DA
    c_ptr,  # (M, N) output y or dX, if HAS_MAIN
    M,  # rows (tokens)
    N,  # output columns: out features (forward) or in features (dX)
    K,  # reduction length: in features (forward) or out features (dX)
    R,  # rank
    stride_am,  # elements to step one row of the main left operand
    stride_ak,  # ... one column of it
    stride_wk,  # ... one row of the main right operand as (K, N)
    stride_wn,  # ... one column of it
    stride_lm,  # ... one row of the LoRA left operand
    stride_lr,  # ... one column of it
    stride_ur,  # ... one row of the LoRA right operand as (R, N)
    stride_un,  # ... one column of it
    stride_xm,  # ... one row of x
    stride_xn,  # ... one column of x
    stride_cm,  # ... one row of the output
    stride_cn,  # ... one column of the output
    lora_scale,  # s forward; s / (1 - p) for dX
    lam,  # λ of B_eff
    da_scale,  # s / (1 - p)
    seed,  # dropout seed, as in _lora_down_kernel (the mask is over the (M, N) tile of x for dX and dA)
    threshold,  # uint32 Philox draws below it drop their element
    m_bucket,  # autotune key only
    HAS_MAIN: tl.constexpr,  # compute the GEMM and store c (False: only the dA epilogue)
    HAS_BIAS: tl.constexpr,  # add the bias (forward)
    HAS_MERGED: tl.constexpr,  # form B_eff from u and um with λ (forward)
    HAS_DROPOUT: tl.constexpr,  # p > 0: mask the LoRA term and x (dX, dA)
    ACC_DA: tl.constexpr,  # accumulate dA = da_scale · lᵀ drop(x) into da_ptr
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile columns
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # M tiles per L2-friendly group
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_ok, n_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
    dt = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_MAIN:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(dt)
            acc = dot(a, w, acc, UPCAST, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
    # the LoRA operands are loaded after the K loop: no registers held across it
    l_tile = tl.load(
        l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        mask=m_ok[:, None] & r_ok[None, :],
        other=0.0,
    ).to(dt)  # (BLOCK_M, R_PAD)
    if HAS_DROPOUT:
        keep = _keep(seed, threshold, offs_m, offs_n, N)
    if HAS_MAIN:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        u_off = offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un
        u = _load_b_eff(u_ptr + u_off, um_ptr + u_off, r_ok[:, None] & n_ok[None, :], lam, HAS_MERGED)
        if HAS_DROPOUT:  # the mask sits between the LoRA product and the sum: its own small dot
            lora = dot(l_tile, u.to(dt), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            acc += lora_scale * tl.where(keep, lora, 0.0)
        else:  # s folded into the (R_PAD, BLOCK_N) tile: the LoRA term lands in the same accumulator
            acc = dot(l_tile, (lora_scale * u).to(dt), acc, UPCAST, PRECISION)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, cast(acc, c_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])
    if ACC_DA:  # the x tile at this (m, n) is exactly the one dA needs: no second pass over x
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn
        x = tl.load(x_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(dt)
        if HAS_DROPOUT:
            x = tl.where(keep, x, tl.zeros_like(x))
        da = dot(tl.trans(l_tile), x, tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
        tl.atomic_add(
            da_ptr + offs_r[:, None] * N + offs_n[None, :],
            da * da_scale,
            mask=r_ok[:, None] & n_ok[None, :],
            sem="relaxed",
        )  # order-free sum: no fence


@triton.jit(do_not_specialize=["M"])
def _lora_dy_kernel(
    dy_ptr,  # (M, N) upstream gradient
    b_ptr,  # (N, R) lora_B
    bm_ptr,  # (N, R) merged B (same strides as B), if HAS_MERGED
    s_ptr,  # (M, R) fp32 S saved by the forward, if ACC_DB
    ds_ptr,  # (M, R) fp32 output dS = dY B_eff (same strides as S)
    db_ptr,  # (N, R) contiguous fp32 dB accumulator (atomic adds over M tiles), if ACC_DB
    M,  # rows (tokens)
    N,  # out features
    R,  # rank
    stride_dm,  # elements to step one row of dY
    stride_dn,  # ... one column of dY
    stride_bn,  # ... one row of B (and of the merged B)
    stride_br,  # ... one column of B
    stride_sm,  # ... one row of S and dS
    stride_sr,  # ... one column of S and dS
    lam,  # λ of B_eff
    db_scale,  # s · λ with a merged B, s without
    m_bucket,  # autotune key only
    HAS_MERGED: tl.constexpr,
    ACC_DB: tl.constexpr,  # B needs a gradient
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows of dY per program (each program sweeps all of N)
    BLOCK_N: tl.constexpr,  # columns per step of the N loop
    UPCAST: tl.constexpr,  # interpreter: dot in fp32
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_ok, r_ok = offs_m < M, offs_r < R
    dt = dy_ptr.dtype.element_ty
    s_off = offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    if ACC_DB:
        s_tile = tl.load(s_ptr + s_off, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(dt)
    dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dm + offs_n[None, :] * stride_dn
    b_off = offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # (BLOCK_N, R_PAD)
    ds = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b_eff = _load_b_eff(b_ptr + b_off, bm_ptr + b_off, n_ok[:, None] & r_ok[None, :], lam, HAS_MERGED)
        ds = dot(dy, b_eff.to(dt), ds, UPCAST, PRECISION)
        if ACC_DB:  # the same dY tile, while it is in registers
            db = dot(tl.trans(dy), s_tile, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), UPCAST, PRECISION)
            tl.atomic_add(
                db_ptr + (n0 + offs_n)[:, None] * R + offs_r[None, :],
                db * db_scale,
                mask=n_ok[:, None] & r_ok[None, :],
                sem="relaxed",
            )
        dy_ptrs += BLOCK_N * stride_dn
        b_off += BLOCK_N * stride_bn
    tl.store(ds_ptr + s_off, ds, mask=m_ok[:, None] & r_ok[None, :])


def _tune_bench(fn, quantiles):
    # a short timing per candidate: tuning runs once per key, and a few configs per kernel suffice
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotune(kernel: str, key: list[str], reset: list[str] | None = None):
    return triton.autotune(
        _configs(kernel),
        key=key,
        reset_to_zero=reset,
        do_bench=_tune_bench,
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )


# keyed on (M bucket, N, K, r) plus the flags that change the work; atomically accumulated outputs
# are zeroed between candidates
down = _autotune("down", ["m_bucket", "K", "R_PAD", "HAS_DROPOUT"])(_lora_down_kernel)
linear = _autotune(
    "linear", ["m_bucket", "N", "K", "R_PAD", "HAS_MAIN", "ACC_DA", "HAS_DROPOUT"], ["da_ptr"]
)(_lora_linear_kernel)
dy = _autotune("dy", ["m_bucket", "N", "R_PAD", "ACC_DB"], ["db_ptr"])(_lora_dy_kernel)

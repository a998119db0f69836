"""Batched orthonormal basis extraction (SLAO step 2) and the batched projection off a basis.

For every matrix ``A (r, d)`` of a batch ``(G, r, d)``: ``Q`` with orthonormal rows spanning A's row
space such that ``A = L Q`` with ``L`` lower triangular and ``diag(L) ≥ 0`` — i.e. ``Qᵀ`` is the Q of
the reduced QR ``Aᵀ = Q R`` with ``diag(R) ≥ 0`` (``mbf.reference.orthonormal_rows`` is the spec).
And ``U − (U Qᵀ) Q`` for batches ``U (G, k, d)``, ``Q (G, r, d)``.

Algorithm: classical Gram-Schmidt with one re-orthogonalisation per row (CGS2, "twice is enough"),
one program per matrix, every pass over ``d`` in blocks of ``BLOCK_D`` with fp32 accumulation. One
launch takes every matrix of a rank whatever its width (a whole Llama: 224 adapters, d = 4096 and
14336): the kernel reads each A in place through a table of addresses (no stacking copy), programs
run widest first so the long matrices start at once and the short ones fill the other SMs.

- Accuracy: CGS2 keeps ``‖Q Qᵀ − I‖ = O(eps)`` for any numerically full-rank A (Giraud et al.,
  2005) and is backward stable row by row, so the row space is kept to ``O(eps ‖A‖)`` whatever the
  condition number. CholeskyQR/CholeskyQR2 in fp32 square the condition number in the Gram matrix
  and break down near cond 1e4 (1e6 is a routine test here); shifted CholeskyQR3's shift grows with
  ``d`` (16384 columns) until it swamps the matrix. Householder is as accurate but needs the same
  ``r`` sequential passes and a sign fix-up afterwards.
- Convention for free: ``R_kk = ‖w_k‖ > 0`` by construction, so no sign fix is needed.
- Range: the launcher scales each A by a power of two (exact; Q is scale-free) so that its largest
  entry lies in [1, 2) and no fp32 sum of squares overflows or underflows.
- Rank deficiency is decided where it happens: row ``k`` is dependent when its residual after both
  projections is ``≤ tau ‖a_k‖``. It is then replaced by the unit vector ``e_j`` of the column ``j``
  least covered by the rows so far (smallest ``Σ_i Q_ij²``, first such j: deterministic, residual
  ``≥ sqrt(1 − k/d)``), orthogonalised the same way, and the matrix is flagged for the warning.
  ``tau = 6 eps_fp32``: any A with condition number ≤ 1e6 has ``R_kk ≥ σ_min ≥ 1e-6 ‖a_k‖`` (8.4 eps),
  while an exactly dependent fp32 row leaves only rounding (< 0.1 eps here: the residual is
  computed against orthonormal rows, so its error scales with ``‖a_k‖``, not ``‖A‖``).
- Cost: ``~r² d`` fp32 loads per matrix: each new row reads the rows built so far twice (the next
  row's first projection rides along with this row's re-orthogonalisation); they sit in L2 for
  r ≤ 64. A mixed-precision CholeskyQR2 (fp64 Gram) would need 3 passes instead of ``O(r)`` and
  is the next step if large ranks ever matter.

Compiled for sm_90 with Triton's ptxas: the CGS2 kernel uses 189-239 registers and no local memory
at R_PAD 16-128; the projection spills ~70 bytes only at 128×128.

Projection: two passes per matrix, ``C = U Qᵀ`` (``tl.dot``) then ``U − C Q``. Every tile is upcast
to fp32 and every ``tl.dot`` runs with ``input_precision="ieee"``: TF32 (10 mantissa bits) would leave
``~1e-3 ‖U‖`` of the old basis behind, and the upcast also sidesteps the interpreter's bf16 ``tl.dot``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mbf.kernels._common import TL_DTYPES, device_of, pad_rank

__all__ = ["MAX_RANK", "orthonormal_rows_many", "project_out"]

MAX_RANK = 128  # the projection's (K_PAD, R_PAD) accumulator lives in registers; beyond, use torch
_TILE = 8192  # elements per (R_PAD, BLOCK_D) tile: 32 KiB of fp32 registers per program
_MAX_BLOCK_D = 4096  # the (BLOCK_D,) row vectors beside the tile: at rank 1, 8192 of them spilled ~0.4-0.9 KB
_DOT_TILE = 2048  # projection tiles: its fp32 tl.dot (FMA path) spills beyond this (sm_90 AOT, ptxas)


def _block_d(r_pad: int, tile: int = _TILE) -> int:
    # A function of the rank alone: one compiled variant per rank, whatever the widths (a narrow
    # matrix leaves lanes masked, which costs nothing next to Llama's d = 4096 / 14336).
    return min(_MAX_BLOCK_D, max(16, tile // r_pad))


def _num_warps(r_pad: int) -> int:
    return 8 if r_pad >= 32 else 4


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _basis_tile(wg_ptr, k, cols, d, rows):
    """Rows ``< k`` of the basis built so far, columns ``cols``: ``(R_PAD, BLOCK_D)`` fp32."""
    mask = (rows[:, None] < k) & (cols[None, :] < d)
    return tl.load(wg_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_x(x_ptr, e_col, cols, d, scale):
    """Columns ``cols`` of ``scale ×`` the row at ``x_ptr``, or of ``e_{e_col}`` when e_col >= 0."""
    # one compare for the mask: the interpreter mis-types a block mask and-ed with a scalar one
    x_len = tl.where(e_col < 0, d, 0)
    x = tl.load(x_ptr + cols, mask=cols < x_len, other=0.0).to(tl.float32) * scale
    return x + tl.where(cols == e_col, 1.0, 0.0)


@triton.jit
def _coefficients(x_ptr, e_col, scale, wg_ptr, k, d, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(Q x, ‖x‖)`` with Q the basis rows ``< k``: the first projection's coefficients."""
    rows = tl.arange(0, R_PAD)
    c = tl.zeros([R_PAD], dtype=tl.float32)
    nrm2 = tl.zeros([], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = _load_x(x_ptr, e_col, cols, d, scale)
        c += tl.sum(_basis_tile(wg_ptr, k, cols, d, rows) * x[None, :], axis=1)
        nrm2 += tl.sum(x * x, axis=0)
    return c, tl.sqrt_rn(nrm2)  # IEEE sqrt: tl.sqrt is the fast approximate one


@triton.jit
def _orthogonalise(
    x_ptr,  # pointer to the row to orthogonalise (ignored when e_col >= 0)
    e_col,  # >= 0: orthogonalise the unit vector e_{e_col} instead of the row
    scale,  # power of two applied to every entry read from A
    c,  # (R_PAD,) Q x, from _coefficients or from the previous row's pass 3
    wg_ptr,  # (r, d) fp32 basis of this matrix; row k receives the residual, not yet normalised
    k,  # rows < k of wg_ptr are orthonormal
    d,
    next_ptr,  # pointer to the next row of A, whose coefficients pass 3 gathers on the way
    next_len,  # d, or 0 after the last row
    R_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """CGS2 given ``c = Q x``: ``W[k] ← v − Qᵀ(Q v)`` with ``v = x − Qᵀc``.

    Returns ``(‖W[k]‖, Q a_next, W[k]·a_next, ‖a_next‖)``: pass 3 reads Q anyway, so the next row's
    first projection costs no pass of its own (2 passes over the basis per row instead of 3).
    """
    rows = tl.arange(0, R_PAD)
    c2 = tl.zeros([R_PAD], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):  # pass 2: v = x − cᵀQ, and already c2 = Q v block by block
        cols = d0 + tl.arange(0, BLOCK_D)
        Qt = _basis_tile(wg_ptr, k, cols, d, rows)
        v = _load_x(x_ptr, e_col, cols, d, scale) - tl.sum(c[:, None] * Qt, axis=0)
        tl.store(wg_ptr + k * d + cols, v, mask=cols < d)
        c2 += tl.sum(Qt * v[None, :], axis=1)
    tl.debug_barrier()  # v was stored by other threads than those that read it back below
    nrm2 = tl.zeros([], dtype=tl.float32)
    c_next = tl.zeros([R_PAD], dtype=tl.float32)
    dot_next = tl.zeros([], dtype=tl.float32)
    nrm2_next = tl.zeros([], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):  # pass 3 (the re-orthogonalisation): w = v − c2ᵀQ
        cols = d0 + tl.arange(0, BLOCK_D)
        Qt = _basis_tile(wg_ptr, k, cols, d, rows)
        w = tl.load(wg_ptr + k * d + cols, mask=cols < d, other=0.0) - tl.sum(c2[:, None] * Qt, axis=0)
        tl.store(wg_ptr + k * d + cols, w, mask=cols < d)
        nrm2 += tl.sum(w * w, axis=0)
        a = tl.load(next_ptr + cols, mask=cols < next_len, other=0.0).to(tl.float32) * scale
        c_next += tl.sum(Qt * a[None, :], axis=1)
        dot_next += tl.sum(w * a, axis=0)
        nrm2_next += tl.sum(a * a, axis=0)
    tl.debug_barrier()
    return tl.sqrt_rn(nrm2), c_next, dot_next, tl.sqrt_rn(nrm2_next)


@triton.jit
def _least_covered_column(wg_ptr, k, d, R_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """First column j minimising ``Σ_{i<k} W_ij²``: e_j has the largest residual off the basis."""
    rows = tl.arange(0, R_PAD)
    best = tl.full([], float("inf"), tl.float32)
    best_j = tl.zeros([], dtype=tl.int32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        Qt = _basis_tile(wg_ptr, k, cols, d, rows)
        lev = tl.where(cols < d, tl.sum(Qt * Qt, axis=0), float("inf"))
        m = tl.min(lev, axis=0)
        j = tl.min(tl.where(lev == m, cols, 2147483647), axis=0)
        best_j = tl.where(m < best, j, best_j)  # strict: ties keep the earlier block's column
        best = tl.minimum(best, m)
    return best_j


@triton.jit(do_not_specialize=["r"])  # a rank of 1 or 16 must not compile another binary
def _cgs2_rows_kernel(
    a_ptrs,  # (G,) int64 addresses of the matrices: (r, d_g) each, contiguous, dtype A_DTYPE
    scales_ptr,  # (G,) fp32 power of two per matrix: its largest entry times it lies in [1, 2)
    w_ptr,  # flat fp32 workspace where the orthonormal rows are built, matrix g at offsets_ptr[g]
    out_ptr,  # flat result in the output dtype, same layout (unused when SEPARATE_OUT is False: w is it)
    offsets_ptr,  # (G,) int64 element offset of matrix g in w and out
    dims_ptr,  # (G,) int32 columns d_g of matrix g
    flags_ptr,  # (G,) int32: 1 where a dependent row was replaced (rank-deficient A)
    r,  # rows of every matrix
    tau,  # relative residual under which a row counts as dependent
    A_DTYPE: tl.constexpr,  # element type behind a_ptrs
    R_PAD: tl.constexpr,  # next power of two >= r
    BLOCK_D: tl.constexpr,  # columns per tile
    SEPARATE_OUT: tl.constexpr,  # out is not w (the output is not fp32)
):
    g = tl.program_id(0)
    ag_ptr = tl.load(a_ptrs + g).to(tl.pointer_type(A_DTYPE))
    scale, d, off = tl.load(scales_ptr + g), tl.load(dims_ptr + g), tl.load(offsets_ptr + g)
    wg_ptr, outg_ptr = w_ptr + off, out_ptr + off
    rows = tl.arange(0, R_PAD)
    flag = tl.zeros([], dtype=tl.int32)
    no_col = tl.zeros([], dtype=tl.int32) - 1  # e_col = -1 at run time: one specialisation of helpers
    c, nrm_a = _coefficients(ag_ptr, no_col, scale, wg_ptr, 0, d, R_PAD, BLOCK_D)  # c = 0: no basis yet
    for k in range(0, r):
        next_ptr, next_len = ag_ptr + (k + 1) * d, tl.where(k + 1 < r, d, 0)
        nrm, c_next, dot_next, nrm_next = _orthogonalise(
            ag_ptr + k * d, no_col, scale, c, wg_ptr, k, d, next_ptr, next_len, R_PAD, BLOCK_D
        )
        dependent = nrm <= tau * nrm_a
        if dependent:  # complete the basis deterministically instead of normalising noise
            j = _least_covered_column(wg_ptr, k, d, R_PAD, BLOCK_D)
            c_j, _ = _coefficients(ag_ptr, j, scale, wg_ptr, k, d, R_PAD, BLOCK_D)
            nrm, c_next, dot_next, nrm_next = _orthogonalise(
                ag_ptr, j, scale, c_j, wg_ptr, k, d, next_ptr, next_len, R_PAD, BLOCK_D
            )
        flag = tl.maximum(flag, dependent.to(tl.int32))
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            q = tl.math.div_rn(tl.load(wg_ptr + k * d + cols, mask=cols < d, other=0.0), nrm)  # IEEE division
            tl.store(wg_ptr + k * d + cols, q, mask=cols < d)
            if SEPARATE_OUT:
                tl.store(outg_ptr + k * d + cols, q.to(out_ptr.dtype.element_ty), mask=cols < d)
        tl.debug_barrier()
        c = tl.where(rows == k, tl.math.div_rn(dot_next, nrm), c_next)  # Q a_{k+1}, q_k included
        nrm_a = nrm_next
    tl.store(flags_ptr + g, flag)


@triton.jit
def _rows_tile(xg_ptr, n, cols, d, N_PAD: tl.constexpr):
    """Rows ``< n`` of a contiguous ``(n, d)`` matrix, columns ``cols``, as fp32 ``(N_PAD, BLOCK_D)``."""
    rows = tl.arange(0, N_PAD)
    mask = (rows[:, None] < n) & (cols[None, :] < d)
    return tl.load(xg_ptr + rows[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["k", "r"])
def _project_out_kernel(
    u_ptr,  # (G, k, d) contiguous rows U to clean
    q_ptr,  # (G, r, d) contiguous orthonormal rows Q to remove
    out_ptr,  # (G, k, d) result in U's dtype
    k,  # rows of U
    r,  # rows of Q
    d,  # columns
    K_PAD: tl.constexpr,  # >= max(16, k), power of two (tl.dot needs 16)
    R_PAD: tl.constexpr,  # >= max(16, r), power of two
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    ug_ptr, qg_ptr, outg_ptr = u_ptr + g * k * d, q_ptr + g * r * d, out_ptr + g * k * d
    C = tl.zeros([K_PAD, R_PAD], dtype=tl.float32)  # U Qᵀ
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        u, q = _rows_tile(ug_ptr, k, cols, d, K_PAD), _rows_tile(qg_ptr, r, cols, d, R_PAD)
        C = tl.dot(u, tl.trans(q), C, input_precision="ieee")
    ku = tl.arange(0, K_PAD)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        u, q = _rows_tile(ug_ptr, k, cols, d, K_PAD), _rows_tile(qg_ptr, r, cols, d, R_PAD)
        out = u - tl.dot(C, q, input_precision="ieee")
        mask = (ku[:, None] < k) & (cols[None, :] < d)
        tl.store(outg_ptr + ku[:, None] * d + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------------


def orthonormal_rows_many(As: Sequence[torch.Tensor], tau: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Orthonormalise matrices of one rank r and any widths in ONE launch (e.g. a whole model's A).

    The kernel reads every A in place through a table of addresses (no stacking copy) and writes
    into one flat buffer that the returned Qs are views of. Programs are ordered widest first, so
    the long matrices (Llama's down_proj, d = 14336) start at once and the short ones fill in.

    Args:
        As: ``(r, d_i)`` contiguous float tensors of one dtype on one device, ``1 <= r <= min(d_i,
            MAX_RANK)``.
        tau: a row whose residual after both projections is ``<= tau ‖a_k‖`` counts as dependent.

    Returns:
        ``(Qs, status)``: Qs ``(r, d_i)`` in the As' dtype; status ``(len(As),)`` int32 on the device:
        0 fine, 1 a dependent row was replaced by a completion direction (rank-deficient A),
        2 A has a non-finite entry (its Q is garbage: the caller must raise).

    Raises:
        ValueError: on mixed ranks, dtypes or devices, r > d, r > MAX_RANK or a non-contiguous A.
    """
    if not As:
        return [], torch.empty(0, dtype=torch.int32)
    r, dtype, device = As[0].shape[0], As[0].dtype, As[0].device
    for i, A in enumerate(As):
        if A.dim() != 2 or A.dtype != dtype or A.device != device or A.shape[0] != r:
            raise ValueError(
                f"matrix {i}: {tuple(A.shape)} {A.dtype} {A.device}, not ({r}, d) {dtype} {device}"
            )
        if not 1 <= r <= A.shape[1] or r > MAX_RANK:
            raise ValueError(f"rank {r} must be in [1, min(d={A.shape[1]}, {MAX_RANK})]; use torch above")
        if not A.is_contiguous():
            raise ValueError(f"matrix {i}: the batched QR reads A in place and needs it contiguous")
    if dtype not in TL_DTYPES:
        raise ValueError(f"dtype {dtype} must be one of {list(TL_DTYPES)}")
    # A power of two per matrix that brings its largest entry into [1, 2): exact, Q does not depend
    # on it, and fp32 sums of squares then neither overflow (|a| > 1e19) nor underflow.
    amax = torch.stack(torch._foreach_norm([A.detach() for A in As], float("inf"))).float()  # one launch
    scales = torch.exp2(-torch.floor(torch.log2(amax.clamp_min(2.0**-100))))
    dims = tuple(A.shape[1] for A in As)
    offsets, total, (table, dims_t, perm) = _layout(tuple(A.data_ptr() for A in As), dims, r, device)
    W = torch.empty(total, dtype=torch.float32, device=device)
    out = W if dtype == torch.float32 else torch.empty(total, dtype=dtype, device=device)
    status = torch.empty(len(As), dtype=torch.int32, device=device)
    r_pad = triton.next_power_of_2(r)
    with device_of(W):
        _cgs2_rows_kernel[(len(As),)](
            a_ptrs=table[0], scales_ptr=scales[perm], w_ptr=W, out_ptr=out, offsets_ptr=table[1],
            dims_ptr=dims_t, flags_ptr=status,
            r=r, tau=float(tau), A_DTYPE=TL_DTYPES[dtype], R_PAD=r_pad, BLOCK_D=_block_d(r_pad),
            SEPARATE_OUT=out is not W, num_warps=_num_warps(r_pad),
        )  # fmt: skip
    status_in_order = torch.empty_like(status)
    status_in_order[perm] = status
    status_in_order = torch.where(amax.isfinite(), status_in_order, 2)
    Qs = [out[offsets[i] : offsets[i] + r * dims[i]].view(r, dims[i]) for i in range(len(As))]
    return Qs, status_in_order


@functools.lru_cache(maxsize=16)
def _layout(
    ptrs: tuple[int, ...], dims: tuple[int, ...], r: int, device: torch.device
) -> tuple[list[int], int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Offsets of each Q in the flat output (widest first), its size, and the kernel's tables.

    A pure function of its arguments, memoised: ContinualLoRA passes the same lora_A tensors at every
    task boundary, so after the first one no table is copied to the device again.
    """
    order = sorted(range(len(dims)), key=lambda i: -dims[i])  # widest first
    offsets = [0] * len(dims)
    for pos in range(1, len(order)):
        offsets[order[pos]] = offsets[order[pos - 1]] + r * dims[order[pos - 1]]
    total = offsets[order[-1]] + r * dims[order[-1]]
    table = torch.tensor([[ptrs[i] for i in order], [offsets[i] for i in order]], dtype=torch.int64)
    dims_t = torch.tensor([dims[i] for i in order], dtype=torch.int32)
    return offsets, total, (table.to(device), dims_t.to(device), torch.tensor(order).to(device))


def project_out(U: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``U − (U Qᵀ) Q`` per matrix, in one launch, computed in fp32 and returned in U's dtype.

    Args:
        U: ``(k, d)`` or ``(G, k, d)``. Q: ``(r, d)`` or ``(G, r, d)`` with orthonormal rows.

    Returns:
        U's shape and dtype: U's rows without their component in Q's row space.

    Raises:
        ValueError: on mismatched shapes or k, r above MAX_RANK.
    """
    squeeze = U.dim() == 2
    U3, Q3 = (U.unsqueeze(0), Q.unsqueeze(0)) if squeeze else (U, Q)
    if U3.dim() != 3 or Q3.dim() != 3 or U3.shape[0] != Q3.shape[0] or U3.shape[2] != Q3.shape[2]:
        raise ValueError(f"U {tuple(U.shape)} and Q {tuple(Q.shape)} must be (G, k, d) and (G, r, d)")
    G, k, d = U3.shape
    r = Q3.shape[1]
    if max(k, r) > MAX_RANK:
        raise ValueError(f"rows k={k}, r={r} must be <= {MAX_RANK}; use backend='torch' beyond")
    U3, Q3 = U3.contiguous(), Q3.contiguous()
    out = torch.empty_like(U3)
    if out.numel():
        k_pad, r_pad = pad_rank(k), pad_rank(r)
        widest = max(k_pad, r_pad)
        with device_of(out):
            _project_out_kernel[(G,)](
                u_ptr=U3, q_ptr=Q3, out_ptr=out, k=k, r=r, d=d, K_PAD=k_pad, R_PAD=r_pad,
                BLOCK_D=_block_d(widest, _DOT_TILE), num_warps=_num_warps(widest),
            )  # fmt: skip
    return out[0] if squeeze else out

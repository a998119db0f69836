"""NF4 base GEMMs of the QLoRA linear: dequantise 4-bit tiles in registers, or once for cuBLAS.

W ``(N, K)`` = ``(out, in)`` is stored as bitsandbytes stores it: byte ``j`` of ``packed`` holds the
codes of flat elements ``2j`` (high nibble) and ``2j + 1`` (low nibble), flat index ``n·K + k``;
``scales[b]`` is the fp32 absmax of flat block ``b`` of 64 elements (the caller expands the double
quantised absmax: ``mbf.nf4.NF4Weight.block_scales``). Element-wise

    W[n, k] = code[nibble(n·K + k)] · scales[(n·K + k) // 64]     (fp32 multiply, then the cast)

and K is a multiple of 64, so a row starts on a byte and a block, and byte ``(n·K + k) // 2`` is
``n·K/2 + k//2``. Kernels:

- ``_nf4_dequant_kernel``: one pass, packed → dense ``(N, K)`` in the compute dtype (feeds cuBLAS).
- ``_nf4_addmm_kernel``: ``C + A Wᵀ`` (forward: ``Y = C_y + X Wᵀ``) or ``C + A W`` (``dX = C_dx + dY W``);
  W tiles are dequantised in registers and the addend ``C`` (the LoRA term, bias and dropout mask
  in it, rounded once by the policy of ``mbf.kernels.policy``) starts the fp32 accumulator.

Which one runs is the route's (``mbf.kernels.route.nf4_path_of``): fused while the token count M is
small, where the GEMM is bound by reading W and reading 0.52 instead of 2 bytes per weight is the
win; dequant + cuBLAS beyond, since the fused kernel dequantises each W tile once per M-tile
(M / BLOCK_M times) while the dequant pass reads W once whatever M is, and from a few hundred tokens
on the GEMM is compute-bound. ``route.FUSED_MAX_M`` is that switch, unmeasured until a GPU measures
the crossover with ``bench/test_bench_nf4.py``, which times both paths over M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbf.kernels._common import cast, device_of, dot, dot_flags, interpreting, tile_ids

__all__ = ["nf4_addmm", "nf4_dequantize"]

QBLOCK = 64  # elements per absmax block (bitsandbytes blocksize)
_QBYTES: tl.constexpr = tl.constexpr(QBLOCK // 2)  # bytes per absmax block, for the kernels


def _gemm_config(M: int, element_size: int) -> dict:
    """Tile sizes (one place; keyed on M and the activations' element size). Fixed, not autotuned:
    nothing was measured on a GPU yet. Each compiles for sm_90 and sm_80 within their shared memory
    and without spills (``tools/compile_check.py``): fp32 tiles take half the columns of 16-bit
    ones (the 16-bit 128x128x64 tile at 3 stages needed 196-262 KB of shared memory in fp32)."""
    if interpreting():  # small tiles: the interpreter's cost grows with the tile volume
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)
    block_m = 64 if M <= 64 else 128
    warps = 8 if block_m == 128 else 4
    if element_size == 4:
        stages = 3 if block_m == 64 else 2
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=stages)
    # 128 x 128 16-bit tiles spilled 80 B on sm_80 under Triton 3.6: the tall tile takes 64 columns
    block_n = 64 if block_m == 128 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=3)


def _dot_flags(x: torch.Tensor) -> dict:
    # fp32 always multiplies in tf32x3 here: Triton 3.9 cannot lower the dX kernel's one-pass TF32
    # wgmma on a dequantised tile ("LLVM ERROR: Illegal shared layout", found by the compile check)
    flags = dot_flags(x)
    return {**flags, "PRECISION": "tf32x3"} if flags["PRECISION"] == "tf32" else flags


# -- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _load_w_tile(
    packed_ptr,  # uint8 codes, two per byte, high nibble first
    scales_ptr,  # fp32 absmax per 64-element block
    code_ptr,  # fp32 (16,) NF4 table
    offs_n,  # (BLOCK_N,) rows of W
    k0,  # first column of the tile (a multiple of 64)
    N,  # rows of W
    K,  # columns of W
    BLOCK_K: tl.constexpr,  # columns of the tile
):
    """``W[offs_n, k0 : k0 + BLOCK_K]`` as an fp32 ``(BLOCK_N, BLOCK_K)`` tile (zeros out of range)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns of the tile
    byte_idx = offs_n[:, None] * (K // 2) + offs_b[None, :]  # (BLOCK_N, BLOCK_K // 2); N·K < 2³¹
    mask = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
    byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + byte_idx // _QBYTES, mask=mask, other=0.0)  # 32 bytes per block
    hi = tl.load(code_ptr + (byte >> 4)) * scale  # the FIRST element of the pair
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    return tl.interleave(hi, lo)  # (BLOCK_N, BLOCK_K): hi at even k, lo at odd k


@triton.jit
def _nf4_mainloop(
    acc,  # (BLOCK_M, BLOCK_OUT) fp32 accumulator to add into
    a_ptr,  # (M, L) left operand, unit column stride: x (forward) or dY (dX)
    stride_am,  # elements to step one row of it
    offs_m,  # (BLOCK_M,) its rows
    M,  # rows
    L,  # reduction length: K (forward) or N (dX)
    packed_ptr,  # NF4 codes of W (N, K)
    scales_ptr,  # fp32 absmax per 64-block of W
    code_ptr,  # fp32 NF4 table
    N,  # rows of W
    K,  # columns of W
    out0,  # first output column of this tile
    TRANS_W: tl.constexpr,  # forward: a @ Wᵀ (reduce over K); dX: a @ W (reduce over N)
    BLOCK_L: tl.constexpr,  # reduction step
    BLOCK_OUT: tl.constexpr,  # output columns per tile
    UPCAST: tl.constexpr,  # interpreter: dot in fp32 (and rounding casts)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """``acc + a @ Wᵀ`` or ``acc + a @ W`` over one output tile, W read from its 4 bits."""
    offs_l = tl.arange(0, BLOCK_L)
    offs_out = out0 + tl.arange(0, BLOCK_OUT)
    dt = a_ptr.dtype.element_ty
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am  # int64: M·L may pass 2³¹
    for l0 in range(0, L, BLOCK_L):
        a_mask = (offs_m[:, None] < M) & ((l0 + offs_l)[None, :] < L)
        a = tl.load(a_rows + (l0 + offs_l)[None, :], mask=a_mask, other=0.0)
        if TRANS_W:  # W[offs_out, l0 : l0 + BLOCK_L]ᵀ: (BLOCK_L, BLOCK_OUT)
            w = tl.trans(_load_w_tile(packed_ptr, scales_ptr, code_ptr, offs_out, l0, N, K, BLOCK_L))
        else:  # W[l0 : l0 + BLOCK_L, out0 : out0 + BLOCK_OUT]
            w = _load_w_tile(packed_ptr, scales_ptr, code_ptr, l0 + offs_l, out0, N, K, BLOCK_OUT)
        acc = dot(a, cast(w, dt, UPCAST), acc, UPCAST, PRECISION)  # W rounded to x's dtype, as dequant does
    return acc


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # uint8 (n/2,)
    scales_ptr,  # fp32 (n/64,)
    code_ptr,  # fp32 (16,)
    out_ptr,  # (n,) in the compute dtype
    n_bytes,  # n / 2
    UPCAST: tl.constexpr,  # interpreter: round the bf16 cast as the GPU does
    BLOCK: tl.constexpr,  # bytes per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + offs // _QBYTES, mask=mask, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    w = tl.interleave(hi, lo)  # (2·BLOCK,) in flat order
    offs_out = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs_out, cast(w, out_ptr.dtype.element_ty, UPCAST), mask=offs_out < 2 * n_bytes)


@triton.jit(do_not_specialize=["M"])  # M = 1 compiles no other binary
def _nf4_addmm_kernel(
    c_ptr,  # (M, OUT) addend in the output dtype, unit column stride
    a_ptr,  # (M, L) activations (x or dY), unit column stride
    packed_ptr,  # NF4 codes of W (N, K)
    scales_ptr,  # fp32 absmax per 64-block of W
    code_ptr,  # fp32 NF4 table
    out_ptr,  # (M, OUT) output, contiguous
    M,  # tokens
    N,  # out features (rows of W)
    K,  # in features (columns of W)
    stride_cm,  # elements to step one row of C
    stride_am,  # ... one row of the activations
    TRANS_W: tl.constexpr,  # forward: OUT = N, reduce over K; dX: OUT = K, reduce over N
    UPCAST: tl.constexpr,  # interpreter: dot in fp32 (and rounding casts)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
    BLOCK_M: tl.constexpr,  # output tile rows
    BLOCK_OUT: tl.constexpr,  # output tile columns
    BLOCK_L: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # M tiles per L2-friendly group
):
    OUT = N if TRANS_W else K
    pid_m, pid_o = tile_ids(M, OUT, BLOCK_M, BLOCK_OUT, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mask = (offs_m[:, None] < M) & (offs_o[None, :] < OUT)
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(c_ptr + rows * stride_cm + offs_o[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = _nf4_mainloop(acc, a_ptr, stride_am, offs_m, M, K if TRANS_W else N, packed_ptr, scales_ptr,
                        code_ptr, N, K, pid_o * BLOCK_OUT, TRANS_W, BLOCK_L, BLOCK_OUT, UPCAST,
                        PRECISION)  # fmt: skip
    tl.store(out_ptr + rows * OUT + offs_o[None, :], cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


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
    if N * K >= 2**31:  # W's byte and block indices are int32 inside the tile loader
        raise ValueError(f"NF4 weight of {N}x{K} elements exceeds the kernels' int32 indexing of W")


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def nf4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Dense ``(N, K)`` W in ``dtype`` from its NF4 storage: one pass, bit-exact to bitsandbytes."""
    _check_nf4(packed, scales, code, shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes, block = packed.numel(), 1024
    with device_of(packed):
        _nf4_dequant_kernel[(triton.cdiv(n_bytes, block),)](
            packed, scales, code, out, n_bytes, UPCAST=interpreting(), BLOCK=block
        )
    return out


def nf4_addmm(
    C: torch.Tensor,
    a: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    transposed: bool,
) -> torch.Tensor:
    """``C + a Wᵀ`` (``transposed``: a ``(M, K)`` → ``(M, N)``) or ``C + a W`` (a ``(M, N)`` → ``(M, K)``).

    ``C`` is the LoRA addend in a's dtype, the output's shape; W is read from its NF4 storage.
    """
    _check_nf4(packed, scales, code, shape)
    N, K = shape
    L, OUT = (K, N) if transposed else (N, K)
    M = a.shape[0]
    if a.shape[1] != L or C.shape != (M, OUT):
        raise ValueError(f"a {tuple(a.shape)} and C {tuple(C.shape)} do not fit W ({N}, {K})")
    a, C = _unit_cols(a), _unit_cols(C.to(a.dtype))
    out = torch.empty((M, OUT), dtype=a.dtype, device=a.device)
    cfg = _gemm_config(M, a.element_size())
    tiles = {"BLOCK_OUT": cfg.pop("BLOCK_N"), "BLOCK_L": cfg.pop("BLOCK_K")}
    if not transposed:  # dX: the output runs along K, the reduction along N
        tiles = {"BLOCK_OUT": tiles["BLOCK_L"], "BLOCK_L": tiles["BLOCK_OUT"]}
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(OUT, tiles["BLOCK_OUT"]),)
    with device_of(a):
        _nf4_addmm_kernel[grid](
            c_ptr=C, a_ptr=a, packed_ptr=packed, scales_ptr=scales, code_ptr=code, out_ptr=out,
            M=M, N=N, K=K, stride_cm=C.stride(0), stride_am=a.stride(0), TRANS_W=transposed,
            **_dot_flags(a), **tiles, **cfg,
        )  # fmt: skip
    return out

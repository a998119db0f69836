"""Launchers, ``torch.library`` ops and autograd of the fused LoRA linear (kernels in ``lora.py``).

Forward ``y = x W0ᵀ + b + s · S B_effᵀ`` with ``S = drop(x) Aᵀ``; backward dX, dA and dB (see
``lora.py`` for the math). ``lora_linear`` is the entry point; ``mbf::lora_linear_fwd`` and
``mbf::lora_linear_bwd`` are custom ops so ``torch.compile`` traces them as opaque calls.
"""

import torch
import triton
from mbf.kernels import lora
from mbf.kernels._common import TL_DTYPES, device_of, dot_flags, pad_rank
from mbf.kernels.lora_configs import launch, wgrad_config
from mbf.kernels.policy import MAX_RANK, LoRAPolicy

__all__ = ["FUSE_MAX_R_PAD", "MAX_RANK", "keep_mask", "lora_linear"]
# dA and dB join the dY and dX passes as fp32 atomics up to this padded rank; beyond it their
# (BLOCK, R_PAD) tiles crowd those kernels (spills at R_PAD 64), and _lora_wgrad_kernel sums them in
# a pass of its own over x and dY (in a fixed order: deterministic as well).
FUSE_MAX_R_PAD = 32
_MAX_STEP_BLOCK = 256  # largest BLOCK of any config: a pointer advances by BLOCK · stride in int32


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _int32_steps(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy, such that every in-kernel pointer step ``BLOCK · stride`` fits int32.

    Base offsets are int64 in the kernels; the per-iteration steps are not (they would cost a 64-bit
    multiply per step). A transposed view whose stride is the other extent gets copied.

    Raises:
        ValueError: when even the contiguous tensor has rows too long for it.
    """
    for cand in (t, t.contiguous()):
        if max(cand.stride(), default=0) * _MAX_STEP_BLOCK < 2**31:
            return cand
    raise ValueError(f"{name}: rows of {t.shape[-1]} elements exceed the kernels' int32 pointer steps")


def _flags(x2: torch.Tensor, A: torch.Tensor) -> dict:
    """Constexprs decided per call: rank padding, interpreter upcast, fp32 dot precision."""
    return {"R_PAD": pad_rank(A.shape[0]), **dot_flags(x2)}


def _forward(x2, weight, bias, A, B, merged_B, scaling, lam, dropout, threshold, seed):
    """Launches 1 and 2: returns y (M, N) in x's dtype and S (M, r) fp32."""
    (M, K), N, r = x2.shape, weight.shape[0], A.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    S = torch.empty((M, r), device=x2.device, dtype=torch.float32)
    if M == 0:
        return y, S
    x2, weight = _int32_steps("x", x2), _int32_steps("weight", weight)
    A, B = A.contiguous(), B.contiguous()
    Bm = merged_B.contiguous() if merged_B is not None else B
    flags, m_bucket = _flags(x2, A), triton.next_power_of_2(M)
    with device_of(x2):
        launch(
            lora.down, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
            x_ptr=x2, a_ptr=A, s_ptr=S, M=M, K=K, R=r,
            stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_ar=A.stride(0), stride_ak=A.stride(1),
            stride_sm=S.stride(0), stride_sr=S.stride(1),
            keep_scale=1.0 / (1.0 - dropout), seed_ptr=_key(seed, S), threshold=threshold, m_bucket=m_bucket,
            HAS_DROPOUT=dropout > 0.0, **flags,
        )  # fmt: skip
        # y = x W0ᵀ + b + s S B_effᵀ: W0 read as (K, N) and B as (R, N) through their strides. Unused
        # pointers get a tensor of the dtype they would have (no second binary for a dtype); dA an
        # empty fp32 one, since the autotuner zeroes it between candidates.
        launch(
            lora.linear, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            a_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else y, l_ptr=S, u_ptr=B, um_ptr=Bm,
            x_ptr=x2, da_ptr=S.new_empty(0), c_ptr=y, M=M, N=N, K=K, R=r,
            stride_am=x2.stride(0), stride_ak=x2.stride(1),
            stride_wk=weight.stride(1), stride_wn=weight.stride(0),
            stride_lm=S.stride(0), stride_lr=S.stride(1), stride_ur=B.stride(1), stride_un=B.stride(0),
            stride_xm=x2.stride(0), stride_xn=x2.stride(1), stride_cm=y.stride(0), stride_cn=y.stride(1),
            lora_scale=float(scaling), lam=float(lam), da_scale=0.0, seed_ptr=S, threshold=0,
            m_bucket=m_bucket,
            HAS_MAIN=True, HAS_BIAS=bias is not None, HAS_MERGED=merged_B is not None, HAS_DROPOUT=False,
            ACC_DA=False, **flags,
        )  # fmt: skip
    return y, S


def _key(seed: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """The seed pointer: the policy's key, or (no dropout: never read) a tensor of a fixed dtype, so
    that the variants without dropout compile one binary."""
    return stand_in if seed is None else seed


def _wgrad(left, right, out, scale, threshold, seed, flags):
    """Deterministic ``out (R, C) = scale · leftᵀ drop(right)`` (``out`` may be a transposed view)."""
    (M, C), R = right.shape, left.shape[1]
    cfg = wgrad_config(max(right.element_size(), out.element_size()))
    lora.wgrad[(triton.cdiv(C, cfg["BLOCK_C"]),)](
        l_ptr=left, x_ptr=right, out_ptr=out, M=M, C=C, R=R,
        stride_lm=left.stride(0), stride_lr=left.stride(1), stride_xm=right.stride(0),
        stride_xc=right.stride(1), stride_or=out.stride(0), stride_oc=out.stride(1),
        scale=scale, seed_ptr=_key(seed, left), threshold=threshold, HAS_DROPOUT=seed is not None, **flags,
        **cfg,
    )  # fmt: skip


def _backward(dY, x2, S, weight, A, B, merged_B, scaling, lam, dropout, threshold, seed, need_dx, need_da,
              need_db):  # fmt: skip
    """Launches 3 and 4: dX (M, K) in x's dtype and the flat ``[dA | dB]`` in the adapters' dtype.

    dA and dB share one buffer: one zeroing launch for both atomic accumulators, and (16-bit
    adapters) one cast; none of either when ``_lora_wgrad_kernel`` writes them in the adapters'
    dtype (deterministic mode, or a padded rank above ``FUSE_MAX_R_PAD``).
    """
    (M, K), N, r = x2.shape, weight.shape[0], A.shape[0]
    n_da, n_db = r * K if need_da else 0, N * r if need_db else 0
    dx = torch.empty((M, K) if need_dx else (0,), device=x2.device, dtype=x2.dtype)
    if M == 0 or not (need_dx or need_da or need_db):
        return dx.zero_(), torch.zeros(n_da + n_db, device=x2.device, dtype=A.dtype)
    flags = _flags(x2, A)
    # atomics (fp32, any order) inside the dY and dX passes, or the fixed-order wgrad kernel
    fused = flags["R_PAD"] <= FUSE_MAX_R_PAD and not torch.are_deterministic_algorithms_enabled()
    acc_dtype = torch.float32 if fused else A.dtype  # the wgrad kernel stores A's dtype
    grads = (torch.zeros if fused else torch.empty)(n_da + n_db, device=x2.device, dtype=acc_dtype)
    dA, dB = grads[:n_da].view(r, K) if need_da else grads, grads[n_da:].view(N, r) if need_db else grads
    x2, weight, dY = _int32_steps("x", x2), _int32_steps("weight", weight), _int32_steps("dY", dY)
    A, B = A.contiguous(), B.contiguous()
    Bm = merged_B.contiguous() if merged_B is not None else B
    dS = torch.empty_like(S)
    m_bucket = triton.next_power_of_2(M)
    drop_scale = float(scaling) / (1.0 - dropout)  # s / (1 − p): the mask's rescale folded into s
    db_scale = float(scaling) * (float(lam) if merged_B is not None else 1.0)  # ∂B_eff/∂B = λ
    has_main, acc_da, acc_db = need_dx, need_da and fused, need_db and fused
    out = dx if need_dx else dY  # a valid pointer when dX is not wanted (HAS_MAIN off)
    unused = S.new_empty(0)  # fp32 like the accumulators it stands for; zeroing it touches nothing
    with device_of(x2):
        if need_dx or need_da or acc_db:
            launch(
                lora.dy, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
                dy_ptr=dY, b_ptr=B, bm_ptr=Bm, s_ptr=S, ds_ptr=dS, db_ptr=dB if acc_db else unused,
                M=M, N=N, R=r,
                stride_dm=dY.stride(0), stride_dn=dY.stride(1), stride_bn=B.stride(0), stride_br=B.stride(1),
                stride_sm=S.stride(0), stride_sr=S.stride(1), lam=float(lam), db_scale=db_scale,
                m_bucket=m_bucket, HAS_MERGED=merged_B is not None, ACC_DB=acc_db, **flags,
            )  # fmt: skip
        if has_main or acc_da:
            # dX = dY W0 + s drop(dS A): W0 read as (N, K) as stored, A as (R, K); dA in the epilogue
            launch(
                lora.linear,
                lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
                a_ptr=dY, w_ptr=weight, bias_ptr=dY, l_ptr=dS, u_ptr=A, um_ptr=A, x_ptr=x2,
                da_ptr=dA if acc_da else unused,
                c_ptr=out, M=M, N=K, K=N, R=r,
                stride_am=dY.stride(0), stride_ak=dY.stride(1), stride_wk=weight.stride(0),
                stride_wn=weight.stride(1), stride_lm=dS.stride(0), stride_lr=dS.stride(1),
                stride_ur=A.stride(0), stride_un=A.stride(1), stride_xm=x2.stride(0), stride_xn=x2.stride(1),
                stride_cm=out.stride(0), stride_cn=out.stride(1),
                lora_scale=drop_scale, lam=1.0, da_scale=drop_scale, seed_ptr=_key(seed, S),
                threshold=threshold,
                m_bucket=m_bucket, HAS_MAIN=has_main, HAS_BIAS=False, HAS_MERGED=False,
                HAS_DROPOUT=dropout > 0.0, ACC_DA=acc_da, **flags,
            )  # fmt: skip
        if need_da and not fused:  # one program per column tile sums all of M in order
            _wgrad(dS, x2, dA, drop_scale, threshold, seed, flags)
        if need_db and not fused:
            _wgrad(S, dY, dB.T, db_scale, 0, None, flags)
    return dx, grads.to(A.dtype)


# ---------------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mbf::lora_linear_fwd", mutates_args=())
def _lora_fwd_op(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    merged_B: torch.Tensor | None,
    scaling: float,
    lam: float,
    dropout: float,
    threshold: int,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x2, weight, bias, A, B, merged_B, scaling, lam, dropout, threshold, seed)


@_lora_fwd_op.register_fake
def _(x2, weight, bias, A, B, merged_B, scaling, lam, dropout, threshold, seed):
    M = x2.shape[0]
    return x2.new_empty((M, weight.shape[0])), x2.new_empty((M, A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mbf::lora_linear_bwd", mutates_args=())
def _lora_bwd_op(
    dY: torch.Tensor,
    x2: torch.Tensor,
    S: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    merged_B: torch.Tensor | None,
    scaling: float,
    lam: float,
    dropout: float,
    threshold: int,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (scaling, lam, dropout, threshold, seed, need_dx, need_da, need_db)
    return _backward(dY, x2, S, weight, A, B, merged_B, *args)


@_lora_bwd_op.register_fake
def _(dY, x2, S, weight, A, B, merged_B, scaling, lam, dropout, threshold, seed, need_dx, need_da, need_db):
    n_grads = (A.numel() if need_da else 0) + (B.numel() if need_db else 0)
    return x2.new_empty(x2.shape if need_dx else (0,)), A.new_empty(n_grads)


def _setup_context(ctx, inputs, output):
    x2, weight, _bias, A, B, merged_B, scaling, lam, dropout, threshold, seed = inputs
    ctx.save_for_backward(x2, output[1], weight, A, B, merged_B)  # x and S: the only activations
    ctx.args = (scaling, lam, dropout, threshold, seed)


def _autograd_backward(ctx, dY, _dS):
    x2, S, weight, A, B, merged_B = ctx.saved_tensors
    need_dx, _, _, need_da, need_db = ctx.needs_input_grad[:5]
    dx, grads = _lora_bwd_op(dY, x2, S, weight, A, B, merged_B, *ctx.args, need_dx, need_da, need_db)
    n_da = A.numel() if need_da else 0  # [dA | dB] come as one flat buffer: split it into views
    return (
        dx if need_dx else None,
        None,
        None,
        grads[:n_da].view(A.shape) if need_da else None,
        grads[n_da:].view(B.shape) if need_db else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_lora_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merged_B: torch.Tensor | None,
    lam: float,
    policy: LoRAPolicy,
) -> torch.Tensor:
    """Fused ``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ``: the Triton twin of ``mbf.reference.lora_linear``.

    Args:
        x: ``(..., K)`` in fp32, fp16 or bf16. weight: ``(N, K)``, frozen. bias: ``(N,)`` or None.
        A: ``(r, K)``, ``1 <= r <= MAX_RANK``. B: ``(N, r)``. merged_B: ``(N, r)`` or None (then
            ``B_eff = B``).
        scaling: ``s = alpha / r``. lam: λ of ``B_eff = merged_B + λ (B − merged_B)``.
        policy: the call's numerics (``mbf.kernels.policy.decide_policy``, which checked p): the
            LoRA branch runs in its compute dtype, the term rounds to x's dtype, dropout draws
            Philox from its key and threshold.

    Returns:
        ``(..., N)`` in x's dtype; differentiable in x, A and B (each gradient in its dtype). Under
        ``torch.use_deterministic_algorithms(True)`` every launch runs one fixed config and dA, dB
        are summed without atomics: the same bits on every run.

    Raises:
        ValueError: when a frozen tensor (weight, bias, merged_B) requires grad, a dtype is not
            fp32 / fp16 / bf16, or r is outside [1, MAX_RANK].
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, merged_B)):
        raise ValueError("the fused LoRA kernel keeps weight, bias and merged_B frozen; one requires grad")
    adapters = [t for t in (A, B, merged_B) if t is not None]
    if any(t.dtype not in TL_DTYPES for t in (x, weight, *adapters)):
        raise ValueError(f"the fused LoRA kernel takes {list(TL_DTYPES)}; got x {x.dtype}, A {A.dtype}")
    if not 1 <= A.shape[0] <= MAX_RANK:
        raise ValueError(f"rank {A.shape[0]} must be in [1, {MAX_RANK}] for the fused LoRA kernel")
    # the casts are differentiable, so each gradient returns in its parameter's dtype
    A, B, merged_B = (None if t is None else t.to(policy.compute_dtype) for t in (A, B, merged_B))
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] >= 2**31:
        raise ValueError(f"{x2.shape[0]} rows: the kernels count tokens in int32")
    y, _ = _lora_fwd_op(
        x2, weight, bias, A, B, merged_B, float(scaling), float(lam), policy.dropout, policy.threshold,
        policy.seed,
    )  # fmt: skip
    return y.view(*x.shape[:-1], weight.shape[0])


def keep_mask(M: int, K: int, threshold: int, seed: torch.Tensor) -> torch.Tensor:
    """The boolean keep mask ``(M, K)`` of Philox key ``seed`` (a 0-d int64 tensor): one launch."""
    out = torch.empty((M, K), dtype=torch.bool, device=seed.device)
    block_m, block_k = 16, 64
    with device_of(seed):
        lora.keep_mask[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            out, M, K, seed, threshold, BLOCK_M=block_m, BLOCK_K=block_k
        )
    return out

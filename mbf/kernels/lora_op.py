"""Launchers, ``torch.library`` ops and autograd of the fused LoRA linear (kernels in ``lora.py``).

Forward ``y = x W0ᵀ + b + s · S B_effᵀ`` with ``S = drop(x) Aᵀ``; backward dX, dA and dB (see
``lora.py`` for the math). ``lora_linear`` is the entry point; ``mbf::lora_linear_fwd`` and
``mbf::lora_linear_bwd`` are custom ops so ``torch.compile`` traces them as opaque calls.
"""

import torch
import triton

from mbf.kernels import lora
from mbf.kernels._common import TL_DTYPES, device_of, dot_flags, pad_rank
from mbf.kernels.lora_configs import launch, linear_budget, sm_count, split_count, wgrad_config
from mbf.kernels.policy import LoRAPolicy, decide_policy
from mbf.kernels.route import MAX_RANK, atomic_grads, da_apart, fused_rank

__all__ = ["keep_mask", "lora_linear"]
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


def _strides(name: str, t: torch.Tensor, dims: str) -> dict:
    """``{"stride_<name><d>": ...}`` of ``t`` for each dimension letter (a kernel's argument names)."""
    return {f"stride_{name}{d}": t.stride(i) for i, d in enumerate(dims)}


def _key(seed: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """The seed pointer: the policy's key, or (no dropout: never read) a tensor of a fixed dtype, so
    that the variants without dropout compile one binary."""
    return stand_in if seed is None else seed


def _split_launch(tuner, out, name, block, length, args):
    """Launch ``tuner`` with each row tile's reduction over ``length`` (``block`` columns per step) shared
    by ``split_count`` programs (the grid's second axis), each writing its part of ``out`` (M, r) into
    ``<name>_ptr``, a ``(P, M, r)`` buffer (``out`` itself when P = 1; ``out`` is contiguous, like
    each part); the parts are then summed into ``out`` in a fixed order."""
    M = out.shape[0]
    split = split_count(tuner, M, length, block, sm_count(out), args)
    parts = out.unsqueeze(0) if split == 1 else out.new_empty((split, *out.shape))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), split)  # noqa: E731
    launch(tuner, grid, **args, **{f"{name}_ptr": parts, f"stride_{name}p": parts.stride(0)})
    if split > 1:
        torch.sum(parts, 0, out=out)


def _down(x2, A, S, *, dropout, threshold, seed, flags, m_bucket):
    """Launch 1: ``S = drop(x) Aᵀ`` (fp32, contiguous), one pass over x (K shared by ``split_count``
    programs)."""
    (M, K), r = x2.shape, A.shape[0]
    args = dict(
        x_ptr=x2, a_ptr=A, M=M, K=K, R=r, **_strides("x", x2, "mk"), **_strides("a", A, "rk"),
        **_strides("s", S, "mr"), keep_scale=1.0 / (1.0 - dropout), seed_ptr=_key(seed, S),
        threshold=threshold, m_bucket=m_bucket, HAS_DROPOUT=seed is not None, **flags,
    )  # fmt: skip
    _split_launch(lora.down, S, "s", "BLOCK_K", K, args)


def _linear(lhs, w_kn, bias, down, up_rn, upm_rn, x, da, out, *, lora_scale, lam, da_scale, threshold, seed,
            has_main, flags, m_bucket):  # fmt: skip
    """Launch 2 / 4: ``out = lhs @ w_kn + addend`` (``w_kn``, ``up_rn``: (K, N), (R, N) views), with the
    dA prologue when ``da`` is given. Unused pointers get a tensor of the dtype they would have (no
    second binary for a dtype); dA an empty fp32 one, since the autotuner zeroes it between candidates."""
    (M, K), N, r = lhs.shape, w_kn.shape[1], down.shape[1]
    launch(
        lora.linear, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        lhs_ptr=lhs, w_ptr=w_kn, bias_ptr=lhs if bias is None else bias, down_ptr=down, up_ptr=up_rn,
        upm_ptr=up_rn if upm_rn is None else upm_rn, x_ptr=x, da_ptr=down.new_empty(0) if da is None else da,
        out_ptr=out, M=M, N=N, K=K, R=r, **_strides("lhs", lhs, "mk"), **_strides("w", w_kn, "kn"),
        **_strides("down", down, "mr"), **_strides("up", up_rn, "rn"), **_strides("x", x, "mn"),
        **_strides("out", out, "mn"), lora_scale=lora_scale, lam=lam, da_scale=da_scale,
        seed_ptr=_key(seed, down), threshold=threshold, m_bucket=m_bucket, HAS_MAIN=has_main,
        HAS_BIAS=bias is not None, HAS_MERGED=upm_rn is not None, HAS_DROPOUT=seed is not None,
        ACC_DA=da is not None, **flags,
    )  # fmt: skip


def _dy(dY, B, Bm, S, dS, dB, *, lam, db_scale, flags, m_bucket):
    """Launch 3: ``dS = dY B_eff`` and (``dB`` given: ``(N, R_PAD)`` fp32, zeroed) ``dB += db_scale · dYᵀ S``,
    one pass over dY (N shared by ``split_count`` programs). S and dS contiguous, like the parts."""
    (M, N), r = dY.shape, B.shape[1]
    args = dict(
        dy_ptr=dY, b_ptr=B, bm_ptr=B if Bm is None else Bm, s_ptr=S,
        db_ptr=S.new_empty(0) if dB is None else dB, M=M, N=N, R=r, **_strides("dy", dY, "mn"),
        **_strides("b", B, "nr"), **_strides("s", S, "mr"), lam=lam, db_scale=db_scale, m_bucket=m_bucket,
        HAS_MERGED=Bm is not None, ACC_DB=dB is not None, **flags,
    )  # fmt: skip
    _split_launch(lora.dy, dS, "ds", "BLOCK_N", N, args)


def _da_apart(dY, A, seed, flags) -> bool:
    """``route.da_apart`` for this dX launch: its tile budgets without and with the dA prologue
    (``linear_budget``) and this GPU's SM count."""
    (M, _), K = dY.shape, A.shape[1]
    args = {"R_PAD": flags["R_PAD"], "PRECISION": flags["PRECISION"], "up_ptr": A, "lhs_ptr": dY,
            "HAS_DROPOUT": seed is not None}  # fmt: skip
    alone, with_da = linear_budget({**args, "ACC_DA": False}), linear_budget({**args, "ACC_DA": True})
    return da_apart(M, K, alone, with_da, sm_count(dY))


def _wgrad(left, right, out, scale, threshold, seed, flags):
    """Deterministic ``out (R, C) = scale · leftᵀ drop(right)`` (``out`` may be a transposed view)."""
    (M, C), R = right.shape, left.shape[1]
    cfg = wgrad_config(max(right.element_size(), out.element_size()))
    lora.wgrad[(triton.cdiv(C, cfg["BLOCK_C"]),)](
        left_ptr=left, right_ptr=right, out_ptr=out, M=M, C=C, R=R, **_strides("left", left, "mr"),
        **_strides("right", right, "mc"), **_strides("out", out, "rc"), scale=scale,
        seed_ptr=_key(seed, left), threshold=threshold, HAS_DROPOUT=seed is not None, **flags, **cfg,
    )  # fmt: skip


def _forward(x2, weight, bias, A, B, merged_B, scaling, lam, dropout, threshold, seed):
    """Launches 1 and 2: returns y (M, N) in x's dtype and S (M, r) fp32."""
    M, N, r = x2.shape[0], weight.shape[0], A.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    S = torch.empty((M, r), device=x2.device, dtype=torch.float32)
    if M == 0:
        return y, S
    x2, weight = _int32_steps("x", x2), _int32_steps("weight", weight)
    A, B = A.contiguous(), B.contiguous()
    Bm = merged_B.contiguous() if merged_B is not None else None
    flags, m_bucket = _flags(x2, A), triton.next_power_of_2(M)
    with device_of(x2):
        _down(x2, A, S, dropout=dropout, threshold=threshold, seed=seed, flags=flags, m_bucket=m_bucket)
        # y = x W0ᵀ + (b + s S B_effᵀ): W0 read as (K, N) and B as (R, N) through their strides
        _linear(x2, weight.T, bias, S, B.T, None if Bm is None else Bm.T, x2, None, y,
                lora_scale=float(scaling), lam=float(lam), da_scale=0.0, threshold=0, seed=None,
                has_main=True, flags=flags, m_bucket=m_bucket)  # fmt: skip
    return y, S


def _backward(dY, x2, S, weight, A, B, merged_B, *, scaling, lam, dropout, threshold, seed, need_dx,
              need_da, need_db):  # fmt: skip
    """Launches 3 and 4: dX (M, K) in x's dtype and the flat ``[dA | dB]`` in the adapters' dtype.

    dA and dB share one buffer: one zeroing launch for both atomic accumulators, and (16-bit
    adapters) one cast (with dB's rows padded to R_PAD for the atomics, one copy more below r = R_PAD);
    none of either when ``_lora_wgrad_kernel`` writes them in the adapters'
    dtype (``route.atomic_grads`` says no: deterministic mode, or a padded rank above
    ``route.FUSE_MAX_R_PAD``).
    """
    (M, K), N, r = x2.shape, weight.shape[0], A.shape[0]
    n_da, n_db = r * K if need_da else 0, N * r if need_db else 0
    dx = torch.empty((M, K) if need_dx else (0,), device=x2.device, dtype=x2.dtype)
    if M == 0 or not (need_dx or need_da or need_db):
        return dx.zero_(), torch.zeros(n_da + n_db, device=x2.device, dtype=A.dtype)
    flags = _flags(x2, A)
    # atomics (fp32, any order) inside the dY and dX passes, or the fixed-order wgrad kernel
    fused = atomic_grads(flags["R_PAD"])
    acc_dtype = torch.float32 if fused else A.dtype  # the wgrad kernel stores A's dtype
    r_db = flags["R_PAD"] if fused else r  # the dY pass adds whole dB rows R_PAD apart (vector atomics)
    n_acc = n_da + (N * r_db if need_db else 0)
    grads = (torch.zeros if fused else torch.empty)(n_acc, device=x2.device, dtype=acc_dtype)
    dA, dB = grads[:n_da].view(r, K) if need_da else grads, grads[n_da:].view(N, r_db) if need_db else grads
    x2, weight, dY = _int32_steps("x", x2), _int32_steps("weight", weight), _int32_steps("dY", dY)
    A, B = A.contiguous(), B.contiguous()
    Bm = merged_B.contiguous() if merged_B is not None else None
    S = S.contiguous()  # as the dY pass's parts of dS are
    dS = torch.empty_like(S)
    m_bucket = triton.next_power_of_2(M)
    drop_scale = float(scaling) / (1.0 - dropout)  # s / (1 − p): the mask's rescale folded into s
    db_scale = float(scaling) * (float(lam) if merged_B is not None else 1.0)  # ∂B_eff/∂B = λ
    acc_da, acc_db = need_da and fused, need_db and fused
    da_apart = need_dx and acc_da and _da_apart(dY, A, seed, flags)
    with device_of(x2):
        if need_dx or need_da or acc_db:
            _dy(dY, B, Bm, S, dS, dB if acc_db else None, lam=float(lam), db_scale=db_scale, flags=flags,
                m_bucket=m_bucket)  # fmt: skip
        # dX = dY W0 + s' drop(dS A): W0 read as (N, K) as stored, A as (R, K); dA in the prologue, or
        # (da_apart, or no dX wanted) in a dA-only launch of the same kernel
        for main, da in ((True, None), (False, dA)) if da_apart else ((need_dx, dA if acc_da else None),):
            if main or da is not None:
                _linear(dY, weight, None, dS, A, None, x2, da, dx if main else dY, lora_scale=drop_scale,
                        lam=1.0, da_scale=drop_scale, threshold=threshold, seed=seed, has_main=main,
                        flags=flags, m_bucket=m_bucket)  # fmt: skip
        if need_da and not fused:  # one program per column tile sums all of M in order
            _wgrad(dS, x2, dA, drop_scale, threshold, seed, flags)
        if need_db and not fused:
            _wgrad(S, dY, dB.T, db_scale, 0, None, flags)
    if need_db and r_db > r:  # drop dB's padding columns (zeros)
        grads = torch.cat((grads[:n_da], dB[:, :r].reshape(-1)))
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
    return _backward(
        dY, x2, S, weight, A, B, merged_B, scaling=scaling, lam=lam, dropout=dropout, threshold=threshold,
        seed=seed, need_dx=need_dx, need_da=need_da, need_db=need_db,
    )  # fmt: skip


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
    merged_B: torch.Tensor | None = None,
    lam: float = 1.0,
    *,
    dropout: float = 0.0,
    seed: int | torch.Tensor | None = None,
    policy: LoRAPolicy | None = None,
) -> torch.Tensor:
    """Fused ``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ``: the Triton twin of ``mbf.reference.lora_linear``.

    The signature is ``mbf.functional.lora_linear``'s and the spec's, up to the keyword-only options
    of each level (here ``policy``).

    Args:
        x: ``(..., K)`` in fp32, fp16 or bf16. weight: ``(N, K)``, frozen. bias: ``(N,)`` or None.
        A: ``(r, K)``, ``1 <= r <= route.MAX_RANK``. B: ``(N, r)``. merged_B: ``(N, r)`` or None (then
            ``B_eff = B``).
        scaling: ``s = alpha / r``. lam: λ of ``B_eff = merged_B + λ (B − merged_B)``.
        dropout: p on the adapter input. seed: its Philox key (an int in [0, 2⁶³) or a 0-d int64
            tensor); None: drawn from torch's generator on x's device.
        policy: the call's numerics, already decided (``mbf.functional.lora_linear`` hands over its
            own, whose key is the one its other paths would draw); None: ``decide_policy`` here. The
            LoRA branch runs in its compute dtype, the term rounds to x's dtype, dropout draws
            Philox from its key and threshold.

    Returns:
        ``(..., N)`` in x's dtype; differentiable in x, A and B (each gradient in its dtype). Under
        ``torch.use_deterministic_algorithms(True)`` every launch runs one fixed config and dA, dB
        are summed without atomics: the same bits on every run.

    Raises:
        ValueError: when a frozen tensor (weight, bias, merged_B) requires grad, a dtype is not
            fp32 / fp16 / bf16, r is outside [1, route.MAX_RANK], dropout is outside [0, 1) or differs
            from the policy's.
    """
    if policy is None:
        policy = decide_policy(x, (A, B, merged_B), dropout, seed)
    elif policy.dropout != dropout:
        raise ValueError(f"dropout {dropout} but the policy was decided for {policy.dropout}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, merged_B)):
        raise ValueError("the fused LoRA kernel keeps weight, bias and merged_B frozen; one requires grad")
    adapters = [t for t in (A, B, merged_B) if t is not None]
    if any(t.dtype not in TL_DTYPES for t in (x, weight, *adapters)):
        raise ValueError(f"the fused LoRA kernel takes {list(TL_DTYPES)}; got x {x.dtype}, A {A.dtype}")
    if not fused_rank(A.shape[0]):
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

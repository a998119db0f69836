"""``lora_linear``: the LoRA linear over any base, and the one autograd Function behind its torch paths.

``y = x W0ᵀ + b + s · (drop(x) Aᵀ) B_effᵀ`` with ``B_eff = B_m + λ (B − B_m)`` (``mbf.reference``
is the spec). ``lora_linear`` decides the call's numerical policy once (``mbf.kernels.policy``:
the LoRA branch's compute dtype, where the term rounds, the Philox dropout key) and runs the path
the route gives (``mbf.kernels.route``: with ``backend="auto"`` on CUDA the one measured fastest for
this GPU and shape by ``mbf.functional.dispatch``, on the CPU torch), handing it the policy. The fused
Triton op over a dense W0 is ``mbf.kernels.lora_op``; every other path runs ``LoRALinearFunction``,
which writes the LoRA algebra once and reads W0 through a base object (``mbf.functional.bases``):
dense, or NF4 read by torch, by the one-pass dequant kernel or by the fused NF4 kernel.

Dropout has one random family on every path (Philox, ``mbf.functional.dropout``): the fused op
regenerates the mask from the key in its tiles; ``LoRALinearFunction`` draws it once as a boolean
``(M, in)`` mask and keeps it for the backward.
"""

from __future__ import annotations

import math

import torch

from mbf.functional import dispatch, lowrank
from mbf.functional._backend import check_backend, kernel
from mbf.functional.bases import DenseBase, lora_addend, nf4_base
from mbf.functional.dropout import keep_mask
from mbf.functional.lowrank import b_eff
from mbf.kernels import interpreting, route
from mbf.kernels.policy import LoRAPolicy, decide_policy
from mbf.nf4 import NF4Weight, dequantize_nf4

__all__ = ["MAX_FUSED_RANK", "LoRALinearFunction", "lora_linear", "lora_linear_nf4"]

MAX_FUSED_RANK = route.MAX_RANK  # public alias of the route's rank limit; above it the torch path runs


class LoRALinearFunction(torch.autograd.Function):
    """``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ`` with a hand-written backward; W0, b and B_m stay frozen.

    ``drop(x) = x ⊙ keep / (1 − p)`` with ``keep`` the policy's boolean ``(M, in)`` Philox mask,
    drawn here once. Saved for backward: x, S and the mask (plus references to the parameters);
    the dropped input is one multiply, redone in the backward rather than held (4 bytes an element).
    The ``1 / (1 − p)`` rescale is folded into the small operands: S and the scaling of dx and dA.
    S, dS, dA and dB are in the policy's compute dtype, made by ``lowrank`` (torch GEMMs, or the
    Triton low-rank kernels: the hybrid path); the base GEMMs take the LoRA term as their addend,
    rounded once to x's dtype (``bases.lora_addend``).
    """

    @staticmethod
    def forward(ctx, x, A, B, base, bias, merged_B, scaling, lam, policy, lowrank):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        keep = keep_mask(policy, *x2.shape)
        S = lowrank.down(x2, A, keep, policy)  # (M, r)
        B_eff = b_eff(B, merged_B, lam, policy.compute_dtype)
        out = base.forward(x2, lora_addend(S, B_eff.T, scaling, x2.dtype, bias))  # (M, out)
        ctx.save_for_backward(x2, S, A, B, merged_B, keep)
        ctx.base, ctx.scaling, ctx.lam, ctx.policy, ctx.lowrank = base, scaling, lam, policy, lowrank
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, S, A, B, merged_B, keep = ctx.saved_tensors
        s, policy = ctx.scaling, ctx.policy
        ct = policy.compute_dtype
        s_drop = s if keep is None else s * policy.keep_scale  # s and the mask's rescale, for dx and dA
        dY2 = dY.reshape(-1, dY.shape[-1])  # (M, out)
        db_scale = s * (1.0 if merged_B is None else ctx.lam)  # ∂B_eff/∂B = λ
        dS, dB = ctx.lowrank.dy(dY2, B, merged_B, ctx.lam, S, db_scale, ctx.needs_input_grad[2], policy)
        dx = dA = None
        if ctx.needs_input_grad[0]:
            term = _masked_(lora_addend(dS, A.to(ct), s_drop, dY2.dtype), keep)  # the mask is linear
            dx = ctx.base.grad_input(dY2, term).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dA = ctx.lowrank.da(dS, x2, keep, s_drop, policy)  # (r, in)
        return dx, _as(dA, A), _as(dB, B), None, None, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merged_B: torch.Tensor | None = None,
    lam: float = 1.0,
    *,
    dropout: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
    nf4_path: str = "auto",
    name: str | None = None,
) -> torch.Tensor:
    """Fused LoRA linear ``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ``; see ``mbf.reference.lora_linear``.

    Args:
        x: ``(..., in)``. weight: ``W0 (out, in)``, frozen: a dense tensor or an ``mbf.nf4.NF4Weight``
            (QLoRA; never saved for backward, re-read from its 4 bits). bias: ``(out,)`` or None.
        A: ``(r, in)``. B: ``(out, r)``. merged_B: ``(out, r)`` or None.
        scaling: ``alpha / r``. lam: λ, with ``B_eff = merged_B + λ (B − merged_B)``.
        dropout: probability on the adapter input. seed: the Philox key of its mask (an int in
            [0, 2⁶³) or a 0-d int64 tensor): the same mask on every path. None: one is drawn from
            torch's generator on x's device, inside the graph (no ``.item()``).
        backend: ``"auto"`` (CUDA tensors: the fastest path measured for this GPU and shape, over a
            dense or an NF4 W0, ``mbf.functional.dispatch``; CPU: torch, or measured under the
            harness ``Dispatcher(cpu=True)``), ``"torch"``,
            ``"triton"`` (the fused kernels) or ``"hybrid"`` (the base GEMMs in cuBLAS with the LoRA
            term as their addend, the low-rank passes S, dS + dB and dA in Triton). Ranks above
            ``MAX_FUSED_RANK`` run the torch path. The whole rule: ``mbf.kernels.route``.
        nf4_path: over an NF4 weight with Triton, ``"fused"`` (dequantise inside the GEMM tiles),
            ``"dequant"`` (one dequant pass + cuBLAS) or ``"auto"`` (with ``backend="auto"``: measured
            with the backends; otherwise by token count, ``mbf.kernels.route.nf4_path_of``).
        name: the layer's name, to start every error message with (``LoRALinear`` passes its own).

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to x, A and B (in their dtypes). The numerics
        follow ``mbf.kernels.policy`` on every path.

    Raises:
        ValueError: on mismatched shapes, a dropout outside [0, 1), an unknown backend or NF4 path,
            or an NF4 weight away from x.
        RuntimeError: an NF4 weight on a device its backend cannot run on, or ``backend="hybrid"``
            with x off CUDA (outside the interpreter).
    """
    where = f"{name}: " if name else ""
    _check_shapes(where, x, weight.shape, bias, A, B, merged_B)
    policy = decide_policy(x, (A, B, merged_B), dropout, seed, where)
    check_backend(backend)
    is_nf4 = isinstance(weight, NF4Weight)
    base = "nf4" if is_nf4 else "dense"
    choice = None
    if route.measures(backend, base, nf4_path, dispatch.dispatches(x)):
        # measured: see dispatch.py (over NF4 the choice is the path: torch, fused or dequant)
        choice = dispatch.auto_backend(
            x, weight, bias, A, B, scaling, merged_B, lam, dropout, run=lora_linear, nf4=is_nf4
        )
    frozen = [t for t in (None if is_nf4 else weight, bias, merged_B) if t is not None]
    way = route.route(
        backend=backend, base=base, rank=A.shape[0], M=math.prod(x.shape[:-1]), cuda=x.is_cuda,
        choice=choice, nf4_path=nf4_path, trainable_base=any(t.requires_grad for t in frozen),
    )  # fmt: skip
    _check_device(way.backend, weight, x, where)
    if way.path == "autograd":  # a trainable base is outside the other paths' contract
        W = dequantize_nf4(weight, x.dtype) if is_nf4 else weight
        return _autograd_lora(x, W, bias, A, B, float(scaling), merged_B, float(lam), policy)
    if way.path == "fused":
        fused = kernel("lora_op", "lora_linear")
        return fused(x, weight, bias, A, B, scaling, merged_B, lam, dropout=dropout, seed=seed, policy=policy)
    W0 = nf4_base(weight, way.path[len("nf4-") :]) if is_nf4 else DenseBase(weight)  # hybrid: cuBLAS
    low = lowrank.TRITON if way.lowrank == "triton" else lowrank.TORCH
    return LoRALinearFunction.apply(x, A, B, W0, bias, merged_B, float(scaling), float(lam), policy, low)


def lora_linear_nf4(x: torch.Tensor, weight: NF4Weight, *args, path: str = "auto", **kwargs) -> torch.Tensor:
    """``lora_linear`` over an NF4 weight with its Triton path named ``path`` (see ``nf4_path``)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"lora_linear_nf4 needs an mbf.nf4.NF4Weight, got {type(weight).__name__}")
    return lora_linear(x, weight, *args, nf4_path=path, **kwargs)


def _autograd_lora(x, W, bias, A, B, scaling, merged_B, lam, policy: LoRAPolicy) -> torch.Tensor:
    """The Function's forward under autograd, for a trainable base (gradients to W and b too)."""
    x2 = x.reshape(-1, x.shape[-1])
    S = lowrank.TORCH.down(x2, A, keep_mask(policy, *x2.shape), policy)
    C = lora_addend(S, b_eff(B, merged_B, lam, policy.compute_dtype).T, scaling, x.dtype, bias)
    return torch.addmm(C, x2, W.to(x.dtype).T).view(*x.shape[:-1], W.shape[0])


def _as(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    """A gradient in its parameter's dtype (bf16 adapters over an fp32 base compute in fp32)."""
    return None if grad is None else grad.to(param.dtype)


def _masked_(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t ⊙ keep`` in place (t is a fresh product), or t without a mask."""
    return t if keep is None else t.mul_(keep)


def _check_shapes(where: str, x, weight_shape, bias, A, B, merged_B) -> None:
    out_f, in_f = weight_shape
    r = A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"{where}x has {x.shape[-1]} features, weight expects {in_f}")
    if A.shape != (r, in_f):
        raise ValueError(f"{where}A has shape {tuple(A.shape)}, expected ({r}, {in_f})")
    if B.shape != (out_f, r):
        raise ValueError(f"{where}B has shape {tuple(B.shape)}, expected ({out_f}, {r})")
    if merged_B is not None and merged_B.shape != B.shape:
        raise ValueError(f"{where}merged_B has shape {tuple(merged_B.shape)}, expected {tuple(B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"{where}bias has shape {tuple(bias.shape)}, expected ({out_f},)")


def _check_device(backend: str, weight, x: torch.Tensor, where: str) -> None:
    if isinstance(weight, NF4Weight):
        check_nf4_device(weight, x, backend, where)
    elif backend == "hybrid" and not x.is_cuda and not interpreting():
        raise RuntimeError(f"{where}backend='hybrid' needs x on a CUDA device, it is on {x.device}")


def check_nf4_device(w: NF4Weight, x: torch.Tensor, backend: str, where: str = "") -> None:
    """Raise when ``w`` sits where ``backend`` cannot run it, or away from ``x``.

    Raises:
        RuntimeError: a device other than cpu / cuda, or Triton on a CPU without the interpreter.
        ValueError: ``x`` on another device than ``w``.
    """
    dev = w.device
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{where}NF4 weight on {dev} cannot run; mbf runs NF4 on cpu (torch) and cuda (Triton)"
        )
    if x.device != dev:
        raise ValueError(f"{where}input on {x.device} but the NF4 weight on {dev}; move one of them")
    if backend in ("triton", "hybrid") and dev.type != "cuda" and not interpreting():
        msg = f"{where}backend={backend!r} needs the NF4 weight on a CUDA device, it is on {dev}"
        raise RuntimeError(msg)

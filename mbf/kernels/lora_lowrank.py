"""The LoRA branch's memory-bound low-rank passes alone, for the hybrid path (base GEMMs in cuBLAS).

The hybrid path (``mbf.functional``, ``backend="hybrid"``) runs the two big GEMMs of the LoRA linear
(``x W0ᵀ`` and ``dY W0``) in cuBLAS with the policy's LoRA addend as their C operand, and only the
low-rank passes in Triton (kernels in ``lora.py``, launched as the fused op launches them):

- ``down``: ``S = drop(x) Aᵀ`` (M, r) fp32, one pass over x, the Philox mask regenerated in-tile;
- ``dy``: ``dS = dY B_eff`` and ``dB = scale · dYᵀ S``, one pass over dY (B_eff formed with λ in-tile);
- ``da``: ``dA = scale · dSᵀ drop(x)``, one program per column tile summing M in a fixed order.

Each returns fp32 products (the caller rounds them to the policy's compute dtype). These are eager
launches (not ``torch.library`` ops): under ``torch.compile`` the dispatch picks the fused op.
"""

import torch
import triton

from mbf.kernels._common import device_of
from mbf.kernels.lora_op import _down, _dy, _flags, _int32_steps, _wgrad
from mbf.kernels.policy import LoRAPolicy
from mbf.kernels.route import atomic_grads

__all__ = ["da", "down", "dy"]


def down(x2: torch.Tensor, A: torch.Tensor, policy: LoRAPolicy) -> torch.Tensor:
    """``S = drop(x2) Aᵀ`` ``(M, r)`` fp32 for x2 ``(M, K)``, A ``(r, K)`` in the compute dtype."""
    M, r = x2.shape[0], A.shape[0]
    S = torch.empty((M, r), device=x2.device, dtype=torch.float32)
    if M == 0:
        return S
    x2, A = _int32_steps("x", x2), A.contiguous()
    with device_of(x2):
        _down(x2, A, S, dropout=policy.dropout, threshold=policy.threshold, seed=policy.seed,
              flags=_flags(x2, A), m_bucket=triton.next_power_of_2(M))  # fmt: skip
    return S


def dy(
    dY: torch.Tensor,
    B: torch.Tensor,
    merged_B: torch.Tensor | None,
    S: torch.Tensor,
    lam: float,
    db_scale: float,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dS, dB)``: ``dY B_eff`` ``(M, r)`` and ``db_scale · dYᵀ S`` ``(N, r)`` (None unless ``need_db``),
    both fp32, from one pass over dY ``(M, N)``; S is the forward's fp32 ``(M, r)``."""
    (M, N), r = dY.shape, B.shape[1]
    dS = torch.empty((M, r), device=dY.device, dtype=torch.float32)
    flags = _flags(dY, B.T)
    atomics = need_db and atomic_grads(flags["R_PAD"]) and M > 0
    # the atomics add whole dB rows R_PAD apart (vector atomics); the padding columns stay zero
    dB = torch.zeros((N, flags["R_PAD"] if atomics else r), device=dY.device, dtype=torch.float32)
    if M == 0:
        return dS, dB if need_db else None
    dY, B, S = _int32_steps("dY", dY), B.contiguous(), S.contiguous()
    Bm = None if merged_B is None else merged_B.contiguous()
    with device_of(dY):
        _dy(dY, B, Bm, S, dS, dB if atomics else None, lam=lam, db_scale=db_scale, flags=flags,
            m_bucket=triton.next_power_of_2(M))  # fmt: skip
        if need_db and not atomics:  # wide ranks / deterministic mode: the fixed-order pass
            _wgrad(S, dY, dB.T, db_scale, 0, None, flags)
    if not need_db:
        return dS, None
    return dS, dB[:, :r].contiguous() if atomics else dB


def da(dS: torch.Tensor, x2: torch.Tensor, scale: float, policy: LoRAPolicy) -> torch.Tensor:
    """``scale · dSᵀ drop(x2)`` ``(r, K)`` fp32 (the policy's mask regenerated from its key)."""
    (M, K), r = x2.shape, dS.shape[1]
    out = torch.zeros((r, K), device=x2.device, dtype=torch.float32)
    if M == 0:
        return out
    x2 = _int32_steps("x", x2)
    with device_of(x2):
        _wgrad(dS, x2, out, scale, policy.threshold, policy.seed, _flags(x2, dS.T))
    return out

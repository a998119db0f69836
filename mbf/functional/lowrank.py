"""The LoRA branch's low-rank products (S, dS with dB, dA), by torch or by the Triton kernels.

``LoRALinearFunction`` writes the LoRA algebra once; the base (``bases.py``) does the two GEMMs over
W0 and this object the three low-rank passes, each in the policy's compute dtype:

- ``down``: ``S = drop(x) Aᵀ`` ``(M, r)``;
- ``dy``: ``dS = dY B_eff`` ``(M, r)`` and ``dB = scale · dYᵀ S`` ``(N, r)`` when wanted;
- ``da``: ``dA = scale · dSᵀ drop(x)`` ``(r, K)``.

``TORCH`` runs them as torch GEMMs (the CPU path); ``TRITON`` as the fused op's memory-bound Triton
kernels (``mbf.kernels.lora_lowrank``: one pass over x, one over dY giving dS and dB, the dropout
mask regenerated from the policy's key): with a dense base in cuBLAS, that is the hybrid path.
"""

from __future__ import annotations

import torch

from mbf.functional._backend import kernel
from mbf.kernels.policy import LoRAPolicy

__all__ = ["TORCH", "TRITON", "b_eff", "masked"]


def b_eff(B: torch.Tensor, merged_B: torch.Tensor | None, lam: float, ct: torch.dtype) -> torch.Tensor:
    """``B_m + λ (B − B_m)`` in ``ct`` (``torch.lerp``: exact at λ = 1), or B without a merged B."""
    return B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)


def masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t ⊙ keep`` (a new tensor), or t itself without a mask."""
    return t if keep is None else t * keep


class _Torch:
    @staticmethod
    def down(x2, A, keep, policy: LoRAPolicy):
        S = masked(x2.to(policy.compute_dtype), keep) @ A.to(policy.compute_dtype).T
        return S if keep is None else S.mul_(policy.keep_scale)  # the rescale on the small product

    @staticmethod
    def dy(dY2, B, merged_B, lam, S, db_scale, need_db, policy: LoRAPolicy):
        dYc = dY2.to(policy.compute_dtype)
        dS = dYc @ b_eff(B, merged_B, lam, policy.compute_dtype)
        return dS, (dYc.T @ S).mul_(db_scale) if need_db else None

    @staticmethod
    def da(dS, x2, keep, scale, policy: LoRAPolicy):
        return (dS.T @ masked(x2.to(policy.compute_dtype), keep)).mul_(scale)


class _Triton:
    @staticmethod
    def down(x2, A, keep, policy: LoRAPolicy):
        return kernel("lora_lowrank", "down")(x2, A.to(policy.compute_dtype), policy).to(policy.compute_dtype)

    @staticmethod
    def dy(dY2, B, merged_B, lam, S, db_scale, need_db, policy: LoRAPolicy):
        ct = policy.compute_dtype
        Bm = None if merged_B is None else merged_B.to(ct)
        dS, dB = kernel("lora_lowrank", "dy")(dY2, B.to(ct), Bm, S.float(), lam, db_scale, need_db)
        return dS.to(ct), None if dB is None else dB.to(ct)

    @staticmethod
    def da(dS, x2, keep, scale, policy: LoRAPolicy):
        return kernel("lora_lowrank", "da")(dS, x2, scale, policy).to(policy.compute_dtype)


TORCH, TRITON = _Torch(), _Triton()

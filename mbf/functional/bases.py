"""How the LoRA autograd Function reads the frozen base weight ``W0 (out, in)``: one small class per base.

Each base provides the two GEMMs that touch W0, with the LoRA term joined to them:

- ``forward(x2, bias, S, B_eff, s)``: ``x2 W0ᵀ + b + s · S B_effᵀ``, ``(M, out)`` in x2's dtype;
- ``grad_input(dY2, dS, A, s, keep)``: ``dY2 W0 + s · (dS A) ⊙ keep``, ``(M, in)`` in dY2's dtype,
  where ``keep`` is the dropout's boolean ``(M, in)`` mask (None: no dropout) and s already carries
  its ``1 / (1 − p)`` rescale.

The LoRA operands (S, B_eff, dS, A) come in the adapter's compute dtype; fp32 adapters over a
16-bit base join the base GEMM as a 16-bit addend (``lora_term_16``). ``DenseBase`` is the
generic version over any base that can hand out W0 as a dense tensor (``dense(dtype)``); the NF4
bases differ only in how that tensor is made, except ``NF4FusedBase``, whose Triton kernels
dequantise W0's tiles in registers and never materialise it. A new base type is one class here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mbf.functional._backend import kernel
from mbf.nf4 import NF4Weight, dequantize_nf4

__all__ = ["DenseBase", "NF4DequantBase", "NF4FusedBase", "NF4TorchBase", "nf4_base"]

NF4_PATHS = ("torch", "dequant", "fused")


def add_scaled(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``out + s · a @ b``: one fused ``addmm`` (one rounding); a, b in out's dtype.

    ``addmm``'s ``alpha`` is also the form torch.compile's inductor keeps (``add_(alpha=)`` it drops).
    """
    return torch.addmm(out, a, b, alpha=s)


def masked_(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t ⊙ keep`` in place (t is a fresh product), or t without a mask: the dropout is linear, so its
    mask applies to the product ``dS A`` as it did to x."""
    return t if keep is None else t.mul_(keep)


def lora_term_16(
    a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``s · a @ b (+ bias)`` in a 16-bit ``dtype`` from fp32 ``a`` (M, r) and ``b`` (r, N): the term a 16-bit
    base GEMM then takes as its addend, so that the base product rounds once, with the sum.

    The operands are rounded to ``dtype`` (fp32 accumulation inside the GEMM) rather than multiplied in
    fp32: the term lands in a 16-bit tensor anyway, and on a CPU the fp32 GEMM, its scaling and its cast
    cost 2-3x the 16-bit GEMM (measured per layer on SmolLM2's q_proj, batch 512, r = 16). The adapter
    gradients do not come from here: they stay fp32-accurate.
    """
    a, b = a.to(dtype), (s * b).to(dtype)  # s folded into the small (r, N) operand
    return a @ b if bias is None else torch.addmm(bias, a, b)


class DenseBase:
    """W0 as a dense tensor (an ``nn.Linear``'s weight), multiplied by torch."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0 (out, in)`` in ``dtype``."""
        return self.weight.to(dtype)

    def forward(self, x2, bias, S, B_eff, s):
        dt = x2.dtype
        W, b = self.dense(dt), None if bias is None else bias.to(dt)
        if S.dtype == dt:
            return add_scaled(F.linear(x2, W, b), S, B_eff.T, s)
        lora = lora_term_16(S, B_eff.T, s, dt, bias=b)  # fp32 adapters over a 16-bit base
        return torch.addmm(lora, x2, W.T)  # x W0ᵀ + (b + lora), the base product rounded once

    def grad_input(self, dY2, dS, A, s, keep):
        W = self.dense(dY2.dtype)
        if dS.dtype == dY2.dtype:
            lora_dx = masked_(dS @ A, keep)
            return torch.addmm(lora_dx, dY2, W, beta=s)  # s · lora_dx + dY W, rounded once
        lora_dx = masked_(lora_term_16(dS, A, s, dY2.dtype), keep)  # a 16-bit base
        return torch.addmm(lora_dx, dY2, W)  # dY W + s · (dS A) ⊙ keep, rounded once


class NF4TorchBase(DenseBase):
    """W0 in NF4, dequantised by torch for each GEMM (the CPU path) and freed after it."""

    def __init__(self, w: NF4Weight) -> None:
        self.w = w

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape

    def dense(self, dtype):
        return dequantize_nf4(self.w, dtype)


class NF4DequantBase(NF4TorchBase):
    """W0 in NF4, dequantised by one Triton pass that feeds cuBLAS (large token counts)."""

    def dense(self, dtype):
        w = self.w
        return kernel("nf4", "nf4_dequantize")(w.packed, w.block_scales(), w.code, w.shape, dtype)


class NF4FusedBase(NF4TorchBase):
    """W0 in NF4, dequantised tile by tile inside the Triton GEMMs (small token counts)."""

    def _storage(self):
        w = self.w
        return w.packed, w.block_scales(), w.code, w.shape

    def forward(self, x2, bias, S, B_eff, s):
        dt = x2.dtype
        fwd = kernel("nf4", "nf4_lora_forward")
        return fwd(x2, *self._storage(), bias=bias, S=S.to(dt), B_eff=B_eff.to(dt), scaling=s)

    def grad_input(self, dY2, dS, A, s, keep):
        dt = dY2.dtype
        dx_kernel = kernel("nf4", "nf4_lora_dx")
        if keep is None:
            return dx_kernel(dY2, *self._storage(), dS=dS.to(dt), A=A.to(dt), scaling=s)
        # the dropout mask sits on the LoRA term only: that term is added outside the kernel
        base = dx_kernel(dY2, *self._storage(), dS=None, A=A.to(dt), scaling=s)
        return base + masked_((dS @ A).mul_(s), keep).to(dt)


def nf4_base(w: NF4Weight, path: str) -> NF4TorchBase:
    """The NF4 base for ``path`` (``"torch"``, ``"dequant"`` or ``"fused"``).

    Raises:
        ValueError: on an unknown path.
    """
    if path not in NF4_PATHS:
        raise ValueError(f"path {path!r} must be one of auto, {', '.join(NF4_PATHS)}")
    return {"torch": NF4TorchBase, "dequant": NF4DequantBase, "fused": NF4FusedBase}[path](w)

"""How the LoRA autograd Function reads the frozen base weight ``W0 (out, in)``: one small class per base.

Each base provides the two GEMMs that touch W0, each with an addend ``C`` that the Function made
from the LoRA term by the call's policy (``mbf.kernels.policy``: the term rounded once to the
output dtype, so that the base product rounds once, with the sum):

- ``forward(x2, C)``: ``x2 W0ᵀ + C``, ``(M, out)`` in x2's dtype (C holds the bias and the term);
- ``grad_input(dY2, C)``: ``dY2 W0 + C``, ``(M, in)`` in dY2's dtype (C holds the masked term).

``DenseBase`` is the generic version over any base that can hand out W0 as a dense tensor
(``dense(dtype)``; one ``addmm``, on a GPU cuBLAS with the term in its C operand); the NF4 bases
differ only in how that tensor is made, except ``NF4FusedBase``, whose Triton kernel dequantises
W0's tiles in registers and never materialises it. A new base type is one class here.
"""

from __future__ import annotations

import torch

from mbf.functional._backend import kernel
from mbf.nf4 import NF4Weight, dequantize_nf4

__all__ = ["DenseBase", "NF4DequantBase", "NF4FusedBase", "NF4TorchBase", "lora_addend", "nf4_base"]


def lora_addend(
    a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``round(bias + round(a) @ round(s · b))`` in ``dtype``: the policy's addend of a base GEMM.

    Args:
        a: ``(M, r)`` (S or dS) and b: ``(r, N)`` (B_effᵀ or A), in the LoRA compute dtype.
        s: the scaling, folded into the small ``(r, N)`` operand before its rounding.
        dtype: the output's dtype (x's). bias: ``(N,)`` or None.

    On a CPU the 16-bit form costs a third of an fp32 term's GEMM, scaling and cast (measured per
    layer on SmolLM2's q_proj, batch 512, r = 16); the adapter gradients do not come from here.
    """
    a, b = a.to(dtype), (s * b).to(dtype)
    return a @ b if bias is None else torch.addmm(bias.to(dtype), a, b)


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

    def forward(self, x2, C):
        return torch.addmm(C, x2, self.dense(x2.dtype).T)

    def grad_input(self, dY2, C):
        return torch.addmm(C, dY2, self.dense(dY2.dtype))


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
    """W0 in NF4, dequantised tile by tile inside the Triton GEMM (small token counts)."""

    def _addmm(self, C, a, transposed):
        w = self.w
        return kernel("nf4", "nf4_addmm")(C, a, w.packed, w.block_scales(), w.code, w.shape, transposed)

    def forward(self, x2, C):
        return self._addmm(C, x2, True)

    def grad_input(self, dY2, C):
        return self._addmm(C, dY2, False)


def nf4_base(w: NF4Weight, path: str) -> NF4TorchBase:
    """The NF4 base for ``path``: ``"torch"``, ``"dequant"`` or ``"fused"`` (the route's NF4 paths,
    ``mbf.kernels.route``, which checks a path a caller names)."""
    return {"torch": NF4TorchBase, "dequant": NF4DequantBase, "fused": NF4FusedBase}[path](w)

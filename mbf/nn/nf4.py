"""NF4Linear: a frozen linear whose weight is NF4 in bitsandbytes' layout (QLoRA's base)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mbf.nf4 import (
    BLOCKSIZE,
    NF4Weight,
    dequantize_nf4,
    quantize,
    to_bnb_linear4bit,
    weight_from_bnb,
    with_dtype,
)

__all__ = ["NF4Linear"]


class NF4Linear(nn.Module):
    """A frozen linear whose weight is NF4 in bitsandbytes' layout; ``forward`` = ``x Wᵀ + b``.

    The NF4 tensors are buffers (they follow ``.to()`` and ``state_dict``); ``self.nf4`` bundles them.
    Use :meth:`from_linear` (quantise a dense linear) or :meth:`from_bnb` (zero-copy).
    """

    def __init__(self, w: NF4Weight, bias: torch.Tensor | None = None, name: str = "NF4Linear") -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.compute_dtype, self.layer_name = w.dtype, name
        self.register_buffer("weight_packed", w.packed)
        self.register_buffer("absmax", w.absmax)
        self.register_buffer("absmax_scale", w.absmax_scale)
        self.register_buffer("absmax_offset", w.absmax_offset)
        self.register_buffer("absmax_code", w.absmax_code)
        self.register_buffer("code", w.code)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.source: nn.Module | None = None  # the bnb Linear4bit it views, for eject()

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(
            self.weight_packed,
            self.absmax,
            self.absmax_scale,
            self.absmax_offset,
            self.absmax_code,
            self.code,
            (self.out_features, self.in_features),
            self.compute_dtype,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True, name: str = "NF4Linear") -> NF4Linear:
        """Quantise a dense ``nn.Linear`` (compute dtype = its weight's dtype)."""
        return cls(quantize(linear.weight, double_quant, name), linear.bias, name)

    @classmethod
    def from_bnb(cls, linear: nn.Module, name: str = "NF4Linear") -> NF4Linear:
        """Zero-copy view of a ``bnb.nn.Linear4bit`` (quantised first if it has not been yet).

        Raises:
            ValueError: fp4, a blocksize other than 64, or in_features not a multiple of 64.
        """
        param = linear.weight
        compute = getattr(linear, "compute_dtype", None)
        if getattr(param, "quant_state", None) is None:  # not yet moved to a device: bnb quantises on .to()
            if param.quant_type != "nf4":
                raise ValueError(f"{name}: 4-bit quant_type {param.quant_type!r} is not supported; use 'nf4'")
            if param.blocksize != BLOCKSIZE:
                raise ValueError(
                    f"{name}: 4-bit blocksize {param.blocksize} is not supported; only {BLOCKSIZE}"
                )
            w = quantize(param.data, param.compress_statistics, name)
            layer = cls(w if compute is None else with_dtype(w, compute), linear.bias, name)
        else:
            layer = cls(weight_from_bnb(param, name, compute), linear.bias, name)
            object.__setattr__(layer, "source", linear)  # not a submodule: no duplicate state_dict entries
        return layer

    def restore(self) -> nn.Module:
        """What ``eject`` puts back: the bnb module this views, while it still shares our storage."""
        src = self.source
        if src is not None and src.weight.data.data_ptr() == self.weight_packed.data_ptr():
            return src
        return self

    def to_bnb(self) -> nn.Module:
        """Export as a ``bnb.nn.Linear4bit`` sharing these tensors (needs bitsandbytes)."""
        return to_bnb_linear4bit(self.nf4, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh 16-bit (or ``dtype``) ``(out, in)`` copy of the weight."""
        return dequantize_nf4(self.nf4, dtype)

    @torch.no_grad()
    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A frozen 16-bit ``nn.Linear`` (the compute dtype) with this bias: of the dequantised weight, or
        of ``weight`` (``(out, in)``, e.g. the dequantised weight plus a folded adapter; rounded once).
        The one way mbf turns a 4-bit linear into a dense one (a fold over it, ``eject(fold=True)``)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight_packed.device, dtype=self.compute_dtype)  # fmt: skip
        dense.weight.copy_(self.dequantize() if weight is None else weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        dq = "double-quant" if self.absmax_scale is not None else "fp32 absmax"
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize=64, {dq}"

"""The numerical policy of the LoRA op: decided once per call, followed by every path (no triton here).

``mbf.functional.lora_linear`` decides a ``LoRAPolicy`` with ``decide_policy`` and hands it to the
path it runs: the torch Function over any base (dense, NF4 by torch / dequant / fused) and the
fused Triton op. ``mbf.reference.lora_linear`` states the same policy as the spec:

- **compute dtype** of the LoRA branch: ``torch.promote_types`` of x's and the adapters' dtypes
  (fp32 adapters over a 16-bit base: fp32; adapters in x's dtype: that dtype). S, dS, B_eff and
  the adapter gradients dA, dB are formed in it with fp32 accumulation, so the adapters' gradients
  never carry a 16-bit rounding they did not ask for.
- **where it rounds**: the base GEMMs, y and dX are in x's dtype (``out_dtype``). The LoRA term
  joins them as the GEMM's addend ``C``, made from operands rounded to ``out_dtype`` and rounded
  to it once::

      C_y  = round(b + round(S) · round(s · B_eff)ᵀ)       y  = round(x W0ᵀ + C_y)
      C_dx = round(round(dS) · round(s' · A)) ⊙ keep       dX = round(dY W0 + C_dx)

  (``s' = s / (1 − p)``). On a CPU this is the cheap form: one 16-bit GEMM for the term, which
  then rides in ``addmm``; on a GPU the term's MMA is 16-bit too. The term lands in a 16-bit
  activation anyway, so its operands' rounding is at the activation's own precision.
- **dropout**: one random family on every backend: Philox-4x32-10 with key = ``seed`` and
  counter = element index (one call per four columns, ``mbf.reference.dropout_keep_mask``), an
  element kept when its draw is ``>= threshold = floor(p · 2³²)``, computed here once. The seed is a
  0-d int64 tensor on x's device: drawn from torch's generator inside the graph when the caller
  gives none (no ``.item()``: no ``torch.compile`` graph break, no host sync), so the same seed
  gives the same mask on the torch path and in the Triton kernels.

Which path runs (and the fused kernels' rank limit) is the route's, not the policy's:
``mbf.kernels.route``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LoRAPolicy", "decide_policy", "dropout_threshold"]


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a Philox draw drops its element: ``floor(p · 2³²)``."""
    return min(int(p * 2**32), 2**32 - 1)


class LoRAPolicy(NamedTuple):
    """How one LoRA call computes (a NamedTuple: immutable, and opaque to nothing in torch.compile)."""

    compute_dtype: torch.dtype  # the LoRA branch: S, dS, B_eff, dA, dB
    out_dtype: torch.dtype  # x's: the base GEMMs, y, dX and the LoRA addend, rounded once to it
    dropout: float  # p in [0, 1) on the adapter's input
    threshold: int  # Philox draws below it drop their element (0 without dropout)
    seed: torch.Tensor | None  # 0-d int64 Philox key on x's device; None without dropout

    @property
    def keep_scale(self) -> float:
        """``1 / (1 − p)``: the rescale of the kept elements."""
        return 1.0 / (1.0 - self.dropout)


def decide_policy(
    x: torch.Tensor,
    adapters: tuple[torch.Tensor | None, ...],
    dropout: float,
    seed: int | torch.Tensor | None,
    where: str = "",
) -> LoRAPolicy:
    """The policy of one call over input ``x`` and adapters ``(A, B, merged_B or None)``.

    Args:
        dropout: p; the one place its range is checked on the call path.
        seed: the dropout's Philox key (an int in [0, 2⁶³) or a 0-d int64 tensor); None: drawn from
            torch's generator on x's device, in the graph.
        where: the layer's name and ": ", to start an error with.

    Raises:
        ValueError: on a dropout outside [0, 1).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}dropout {dropout} must be in [0, 1)")
    ct = x.dtype
    for t in adapters:
        if t is not None:
            ct = torch.promote_types(ct, t.dtype)
    key = None
    if dropout > 0.0:
        if seed is None:
            key = torch.randint(0, 2**62, (), device=x.device)
        elif isinstance(seed, torch.Tensor):
            key = seed.to(device=x.device, dtype=torch.int64).reshape(())
        else:
            key = torch.tensor(seed, dtype=torch.int64, device=x.device)
    return LoRAPolicy(ct, x.dtype, float(dropout), dropout_threshold(dropout), key)

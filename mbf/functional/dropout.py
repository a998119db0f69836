"""LoRA dropout's keep mask on the torch paths: the Triton kernels' Philox stream, vectorised.

The mask is ``mbf.reference.dropout_keep_mask`` bit for bit (the spec; the policy is in
``mbf.kernels.policy``): element (m, k) of an ``(M, K)`` input is kept when word ``k mod 4`` of
Philox-4x32-10 at counter ``m·⌈K/4⌉ + ⌊k/4⌋`` with key = seed is ``>= threshold``. The reference
splits every 32x32-bit product into 16-bit limbs (obvious, slow); here one int64 multiply gives
the whole product modulo 2⁶⁴ (two's complement wraps), whose words are the high and low halves,
and the low half rides unmasked into the next round, where only its low 32 bits meet an XOR
before the one ``& 0xFFFFFFFF``: 10 tensor ops a round instead of ~30. The key is a 0-d tensor, so
the graph has no ``.item()`` and torch.compile traces it (and fuses it into one loop).

On CUDA tensors with triton at hand the Triton kernels draw it (``mbf.kernels.lora_op.keep_mask``):
one launch instead of ~100.
"""

from __future__ import annotations

import torch

from mbf.functional._backend import kernel
from mbf.kernels.policy import LoRAPolicy

__all__ = ["keep_mask", "philox_keep_mask"]

_U32 = 0xFFFFFFFF
# Philox-4x32-10 constants (those of triton.language.random)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _philox4x(key: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (in int64) of Philox-4x32-10 at ``counters`` (int64 ≥ 0) under ``key``."""
    rounds = torch.arange(10, dtype=torch.int64, device=counters.device)
    k0s = ((key & _U32) + rounds * _KEY_A) & _U32  # the key schedule, one small tensor each
    k1s = (((key >> 32) & _U32) + rounds * _KEY_B) & _U32
    c0, c1 = counters & _U32, counters >> 32
    c2 = c3 = torch.zeros_like(c0)
    for k0, k1 in zip(k0s.unbind(), k1s.unbind()):
        pb, pa = c2 * _ROUND_B, c0 * _ROUND_A  # 64-bit products: (high word, low word)
        # c1, c3: the last round's whole products; only their low words survive the masks
        c0 = (pb >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_U32)  # in place: no allocations
        c2 = (pa >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_U32)
        c1, c3 = pb, pa
    return c0, c1 & _U32, c2, c3 & _U32


def philox_keep_mask(M: int, K: int, threshold: int, key: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask ``(M, K)`` on key's device: ``mbf.reference.dropout_keep_mask``'s bits."""
    quads = (K + 3) // 4
    counters = torch.arange(M * quads, dtype=torch.int64, device=key.device).view(M, quads)
    words = torch.stack(_philox4x(key, counters), dim=-1).view(M, 4 * quads)  # column 4j + i <- word i
    return words[:, :K] >= threshold


def keep_mask(policy: LoRAPolicy, M: int, K: int) -> torch.Tensor | None:
    """The policy's keep mask over an ``(M, K)`` input, None without dropout."""
    if policy.seed is None:
        return None
    if policy.seed.is_cuda:
        try:
            draw = kernel("lora_op", "keep_mask")
        except NotImplementedError:  # no triton on this machine: the same bits, vectorised
            draw = philox_keep_mask
        return draw(M, K, policy.threshold, policy.seed)
    return philox_keep_mask(M, K, policy.threshold, policy.seed)

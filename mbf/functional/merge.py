"""SLAO's step 3 for a whole model: every layer's ``B_m ← B_m + λ (B_ft − B_m)`` at once, in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mbf.closed_form import work_dtype
from mbf.functional._backend import kernel, resolve_backend

__all__ = ["time_aware_merge_"]


def time_aware_merge_(
    merged_Bs: Sequence[torch.Tensor], ft_Bs: Sequence[torch.Tensor], lam: float, backend: str = "auto"
) -> None:
    """In place for every layer: ``B_m ← B_m + λ (B_ft − B_m)``, computed in fp32, all layers at once.

    Both paths evaluate it as ``torch.lerp`` does (``B_ft − (1 − λ)(B_ft − B_m)`` for λ ≥ 0.5), so
    λ = 1 (task 1) gives ``B_m = B_ft`` exactly.

    Args:
        merged_Bs: the merged B buffers (updated in place). ft_Bs: the fine-tuned Bs, same shapes.
        lam: λ(i) of the task just finished.
        backend: ``"auto"``, ``"torch"`` (``torch._foreach_lerp_`` per dtype group) or ``"triton"``
            (one launch per dtype pair).

    Raises:
        ValueError: on mismatched lengths or shapes.
    """
    if len(merged_Bs) != len(ft_Bs):
        raise ValueError(f"{len(merged_Bs)} merged Bs but {len(ft_Bs)} fine-tuned Bs")
    for m, f in zip(merged_Bs, ft_Bs):
        if m.shape != f.shape:
            raise ValueError(f"merged B {tuple(m.shape)} and fine-tuned B {tuple(f.shape)} differ")
    if not merged_Bs:
        return
    with torch.no_grad():
        if resolve_backend(backend, merged_Bs[0]) == "triton":
            kernel("merge", "time_aware_merge_")(list(merged_Bs), [f.detach() for f in ft_Bs], lam)
            return
        groups: dict[tuple, list[int]] = {}
        for i, (m, f) in enumerate(zip(merged_Bs, ft_Bs)):
            groups.setdefault((m.dtype, f.dtype, m.device), []).append(i)
        for (m_dtype, _, _), idx in groups.items():
            ct = work_dtype(m_dtype)
            ms = [merged_Bs[i] for i in idx]
            work = ms if m_dtype == ct else [m.to(ct) for m in ms]  # fp32 math for half storage
            torch._foreach_lerp_(work, [ft_Bs[i].detach().to(ct) for i in idx], float(lam))
            if work is not ms:
                torch._foreach_copy_(ms, work)

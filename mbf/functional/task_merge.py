"""Per-task LoRA merging over a whole model: task arithmetic and TIES on the task vectors ``τ_t = s B_t A_t``.

The merges act on the full ``ΔW`` products (``(out, in)`` per layer), not on the factors: ``B A`` is
not linear in (A, B), so averaging factors of adapters trained from the same start would not be
the task vectors' merge. The spec is ``mbf.reference.task_arithmetic`` / ``ties_merge`` over the whole
model's task vectors flattened into rows; here the same is computed layer by layer (TIES's trim
threshold is each task's over all its layers, as the paper trims the whole task vector), in fp32,
so the stacked task vectors of the whole model are never held at once: one layer's ``T × out × in``
at a time, plus one task's magnitudes while its threshold is found.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["MERGES", "low_rank_factors", "merge_task_vectors", "task_vector", "ties_thresholds"]

MERGES = ("task_arithmetic", "ties")


def task_vector(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``τ = s · B A`` in fp32: the ``(out, in)`` weight change of a LoRA ``A (r, in)``, ``B (out, r)``."""
    return scaling * (B.detach().float() @ A.detach().float())


def ties_thresholds(tasks: Iterable[Iterable[torch.Tensor]], density: float) -> torch.Tensor:
    """TIES's trim threshold of each task: the k-th largest magnitude over all its layers' task vectors,
    ``k = max(1, round(density · N))`` with N the task vector's entries (``reference.ties_trim``).

    Args:
        tasks: per task, its per-layer task vectors (an iterable each: a generator holds one task's
            vectors at a time).
        density: the fraction kept, in (0, 1] (the paper's k = 20%: 0.2).

    Returns:
        ``(T,)`` fp32 thresholds; an entry of task t survives the trim iff ``|τ_t| >= threshold[t]``.

    Raises:
        ValueError: a density outside (0, 1], or a task without entries.
    """
    check_density(density)
    out = []
    for t, layers in enumerate(tasks):
        mags = torch.cat([d.detach().float().reshape(-1).abs() for d in layers])
        if mags.numel() == 0:
            raise ValueError(f"ties_thresholds: task {t + 1} has no entries")
        k = max(1, round(density * mags.numel()))
        out.append(mags.kthvalue(mags.numel() - k + 1).values)  # the k-th largest, in O(N)
    return torch.stack(out)


def check_density(density: float) -> None:
    """Raise ValueError unless the TIES density (fraction of each task vector kept) is in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(
            f"TIES density={density!r} must be in (0, 1] (the fraction of each task vector kept)"
        )


def merge_task_vectors(
    deltas: Sequence[torch.Tensor],
    merge: str,
    *,
    lam: float,
    thresholds: torch.Tensor | None = None,
    density: float = 0.2,
) -> torch.Tensor:
    """One layer's merged ``ΔW`` from its task vectors (fp32).

    ``"task_arithmetic"``: ``λ Σ_t τ_t``. ``"ties"``: each ``τ_t`` trimmed at ``thresholds[t]``
    (``ties_thresholds`` of the whole model; None: this layer's own top ``density``), the sign of every
    entry elected as ``sgn(Σ_t τ̂_t)``, then ``λ`` times the mean over the tasks whose trimmed value
    has that sign (0 where none has; see ``reference.ties_merge``).

    Args:
        deltas: T task vectors of one layer, all ``(out, in)``.
        merge: one of ``MERGES``.
        lam: the scaling λ of the merged vector.
        thresholds: ``(T,)`` trim thresholds (TIES only).
        density: the fraction kept when ``thresholds`` is None (TIES only).

    Raises:
        ValueError: an unknown merge, no task vectors, shapes that differ, or thresholds of another length.
    """
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r} must be one of {', '.join(MERGES)}")
    if not deltas:
        raise ValueError("merge_task_vectors: no task vectors to merge")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) > 1:
        raise ValueError(f"merge_task_vectors: task vectors of different shapes {sorted(shapes)}")
    stacked = torch.stack([d.detach().float() for d in deltas])  # (T, out, in)
    if merge == "task_arithmetic":
        return lam * stacked.sum(dim=0)
    if thresholds is None:
        thresholds = ties_thresholds([[d] for d in stacked], density)
    if thresholds.shape != (len(deltas),):
        raise ValueError(f"merge_task_vectors: {tuple(thresholds.shape)} thresholds for {len(deltas)} tasks")
    keep = stacked.abs() >= thresholds.float().view(-1, *[1] * (stacked.dim() - 1))
    trimmed = stacked * keep
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    return lam * (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def low_rank_factors(delta: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` with ``s · B A`` the best rank-r approximation of ``delta (out, in)``
    (truncated SVD, Eckart–Young): ``A = V_rᵀ`` (orthonormal rows), ``B = U_r Σ_r / s``. fp32.

    Raises:
        ValueError: ``r`` outside ``[1, min(out, in)]``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(delta.shape):
        raise ValueError(f"low-rank merge: rank {r!r} must be an integer in [1, {min(delta.shape)}]")
    U, S, Vh = torch.linalg.svd(delta.detach().float(), full_matrices=False)
    return Vh[:r].contiguous(), (U[:, :r] * (S[:r] / scaling)).contiguous()

"""The methods' closed-form steps as the package runs them: λ schedules, the dtype of the task-boundary
math, the projection off a basis, InfLoRA's designed A and DualGPM memory update.

Pure PyTorch (no other mbf module): the bottom layer beside ``mbf.kernels``, imported by
``mbf.functional`` (the torch paths of the batched boundary ops), ``mbf.strategies`` (SLAO's λ, InfLoRA,
sketch-merge) and the command line. ``mbf.reference`` is the float64 spec the tests hold these to
(where it states a step independently) and the tests check the rest against hand-computed values.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "INFLORA_SCALE",
    "SCHEDULES",
    "dualgpm_update",
    "free_projector",
    "inflora_design",
    "lam_schedule",
    "project_out",
    "work_dtype",
]

SCHEDULES = ("sqrt", "inverse", "constant", "none")  # λ(i) of the time-aware merge (lam_schedule)


def lam_schedule(schedule: str, i: int, constant: float = 0.5) -> float:
    """λ(i) for task ``i ≥ 1``: ``sqrt`` 1/√i (SLAO), ``inverse`` 1/i, ``constant`` c, ``none`` 1.

    Task 1 always gets λ = 1 so that after it the merged adapter equals the fine-tuned one.

    Raises:
        ValueError: ``i < 1`` or an unknown schedule.
    """
    if i < 1:
        raise ValueError(f"task index {i} must be >= 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if i == 1 or schedule == "none":
        return 1.0
    if schedule == "sqrt":
        return 1.0 / math.sqrt(i)
    if schedule == "inverse":
        return 1.0 / i
    return float(constant)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype QR, projections and merges compute in: fp32 whatever the parameter dtype (float64
    stays float64, the tests' spec runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project_out(U: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``U − (U Qᵀ) Q`` in ``work_dtype``: the rows of ``U (..., k, d)`` without their part in the row space
    of orthonormal ``Q (..., r, d)`` (leading dims a batch); U's dtype."""
    ct = work_dtype(U.dtype)
    U32, Q32 = U.to(ct), Q.to(ct)
    return (U32 - (U32 @ Q32.transpose(-1, -2)) @ Q32).to(U.dtype)


# InfLoRA (Liang & Li, CVPR 2024), over a layer's input covariance ``C = Σ x xᵀ / n`` ``(in, in)`` (so
# ``C = H Hᵀ / n`` for the paper's input matrix ``H``) and its DualGPM memory ``M`` ``(in, k)``, orthonormal
# columns: the protected (old tasks') input subspace when ``kind`` is "remove", its orthogonal complement
# when "retain" (whichever needs fewer columns). Run in fp32 on the model's statistics; the tests run them
# in float64 against hand-made activations (tests/test_inflora.py).
INFLORA_SCALE = 3**-0.5  # designed rows' norm: a Kaiming-uniform (a=√5) row's expected one (the paper's code)


def free_projector(memory: torch.Tensor, kind: str) -> torch.Tensor:
    """``(in, in)`` projector onto the input subspace no past task protects."""
    inside = memory @ memory.T
    if kind == "retain":
        return inside
    return torch.eye(len(memory), dtype=memory.dtype, device=memory.device) - inside


def _eig_desc(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(sym)
    return vals.flip(0).clamp(min=0), vecs.flip(1)


def inflora_design(cov: torch.Tensor, memory: torch.Tensor, kind: str, r: int) -> torch.Tensor:
    """Task t's designed ``A`` ``(r, in)`` (the paper's dimensionality-reduction ``B_t``): the top-r left
    singular vectors of the projected inputs ``Ĥ = P H`` (``P`` onto the unprotected subspace), i.e. the
    top-r eigenvectors of ``P C P``, as rows scaled by ``INFLORA_SCALE``; each row's largest-magnitude
    entry positive. ``P C P + δ P`` has the same eigenvectors (P commutes with P C P, the shift is
    uniform on the unprotected subspace) but no zero eigenvalue there: when the inputs span fewer than r
    unprotected directions, the rest are still drawn from it, never from the protected subspace."""
    P = free_projector(memory, kind)
    delta = torch.trace(cov) / len(cov) if torch.trace(cov) > 0 else 1.0  # the mean eigenvalue: C's scale
    _, vecs = _eig_desc(P @ cov @ P + delta * P)
    rows = vecs[:, :r].T  # (r, in)
    sign = torch.sign(rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)))
    return INFLORA_SCALE * rows * sign


def dualgpm_update(
    cov: torch.Tensor, memory: torch.Tensor, kind: str, threshold: float
) -> tuple[torch.Tensor, str]:
    """The memory after a task (DualGPM, Liang & Li 2023, as InfLoRA uses it): protect the fewest leading
    new input directions such that the protected share of the task's input energy reaches ``threshold``
    (ε), ``‖P_old H‖² + Σ_{j≤k} σ̂_j² ≥ ε ‖H‖²`` with ``σ̂_j²`` the eigenvalues of ``P_free C P_free``;
    then keep the representation with fewer columns (more than in/2 protected: store the complement).

    Returns:
        ``(memory (in, k'), kind)``.
    """
    n, total = cov.shape[0], torch.trace(cov)
    if total <= 0:  # no input energy: nothing to protect
        return memory, kind
    P = free_projector(memory, kind)
    vals, vecs = _eig_desc(P @ cov @ P)
    captured = 1 - vals.sum() / total  # share of the energy already protected
    need = captured + torch.cumsum(vals, 0) / total
    k = 0 if captured >= threshold else min(int((need < threshold).sum()) + 1, len(vals))
    new = vecs[:, :k]  # (in, k): in the unprotected subspace
    if kind == "remove":
        memory = torch.cat([memory, new], dim=1)[:, :n]
    elif k := min(k, memory.shape[1]):  # retain: the free subspace loses the new directions
        inside = memory.T @ new  # (k_free, k): the new directions in memory's coordinates
        full, _ = torch.linalg.qr(inside, mode="complete")
        memory = memory @ full[:, k:]
    if kind == "remove" and memory.shape[1] > n / 2:
        full, _ = torch.linalg.qr(memory, mode="complete")
        memory, kind = full[:, memory.shape[1] :], "retain"
    return memory, kind

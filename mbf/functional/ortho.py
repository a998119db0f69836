"""SLAO's step 2 for a whole model: orthonormal rows of every adapter's A, and projections off them.

The Triton path is one launch per rank (all widths together); the torch path one stacked call per
shape group on CUDA, and on CPU stacks of small matrices or large ones one by one. Both follow
``mbf.reference.orthonormal_rows`` (the spec) and flag rank-deficient matrices the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from mbf.closed_form import project_out as _project_out_torch
from mbf.closed_form import work_dtype
from mbf.functional._backend import kernel, resolve_backend

__all__ = ["DEPENDENT_ROW_TOL", "orthonormal_rows", "project_out", "project_out_all"]


# A row of A counts as dependent on the rows before it when what is left of it after projecting
# them out, R_kk, is at most this fraction of its norm. Any A with condition number <= 1e6 has
# R_kk >= sigma_min >= 1e-6 ||a_k|| (8.4 eps of fp32); an exactly dependent fp32 row leaves only
# rounding: < 0.1 eps in the kernel's CGS2, up to 3.4 eps in Householder's R (measured, r=64, d=4096).
DEPENDENT_ROW_TOL = 6.0 * torch.finfo(torch.float32).eps


def orthonormal_rows(
    As: Sequence[torch.Tensor], names: Sequence[str] | None = None, backend: str = "auto"
) -> list[torch.Tensor]:
    """Orthonormalise every ``A (r, d)`` of a model: SLAO step 2, batched.

    The Triton path is one launch per rank (all widths together); the torch path one stacked call
    per shape group on CUDA, and on CPU stacks of small matrices or large ones one by one.

    Args:
        As: the adapters' A matrices (any mix of shapes, ``r <= d``).
        names: a name per matrix for error messages (layer names); indices when None.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        A list of ``Q`` with the same shapes and dtypes: ``Qᵀ`` of ``qr(Aᵀ)`` with ``diag(R) ≥ 0``,
        computed in fp32 (fp64 stays fp64). A rank-deficient A gets its dependent rows replaced by
        deterministic completion directions (a warning names the layer): Q still has r orthonormal
        rows and its row space contains A's.

    Raises:
        ValueError: when a matrix has non-finite values or more rows than columns (names it).
    """
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(As))]
    for name, A in zip(names, As):
        if A.dim() != 2 or A.shape[0] > A.shape[1]:
            raise ValueError(f"{name}: A of shape {tuple(A.shape)} must be (r, d) with r <= d")
    out: list[torch.Tensor | None] = [None] * len(As)
    order: list[int] = []  # layer of each entry of the flag lists below
    finite, deficient = [], []  # per group: (G,) bool tensors, brought to the host together
    for use_triton, idx in _ortho_groups(As, backend):
        first = As[idx[0]]
        if use_triton:  # one launch for every width of this rank (the kernel reads A in place)
            Qs, status = kernel("ortho", "orthonormal_rows_many")(
                [As[i].detach().contiguous() for i in idx], tau=DEPENDENT_ROW_TOL
            )
            flags, ok = status == 1, status != 2
        elif first.is_cuda:
            batch = torch.stack([As[i].detach() for i in idx])  # (G, r, d): one call for the group
            Q, diag, norms, ok = _torch_orthonormal_rows(batch)
            flags = _dependent(diag, norms)
            Qs = list(Q)
        else:
            # CPU: LAPACK factors one matrix per call whether torch is given a batch or not. A stack
            # of small matrices saves per-call overhead; for large ones the stacked call only adds
            # copies (measured 1.3-1.8x slower than a loop), so those go one by one as views.
            parts = [_torch_orthonormal_rows(_stack(As, chunk)) for chunk in _cpu_chunks(idx, first)]
            Qs = [Q for part in parts for Q in part[0]]
            diag, norms = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
            flags, ok = _dependent(diag, norms), torch.cat([p[3] for p in parts])
        for i, Q in zip(idx, Qs):
            out[i] = Q
        order += idx
        finite.append(ok)
        deficient.append(flags)
    finite_host = _host_bools(finite)  # one sync for all groups
    if not all(finite_host):  # an fp32 norm also overflows on huge finite entries: look closer
        finite_host = [f or bool(torch.isfinite(As[i]).all()) for i, f in zip(order, finite_host)]
    if not all(finite_host):
        bad = names[order[finite_host.index(False)]]
        raise ValueError(f"{bad}: lora_A has non-finite values; cannot orthonormalise it")
    _warn_rank_deficient(_host_bools(deficient), [names[i] for i in order])  # one more sync
    return out  # type: ignore[return-value]


def _ortho_groups(As: Sequence[torch.Tensor], backend: str) -> list[tuple[bool, list[int]]]:
    """``(use_triton, indices)`` per call: by rank alone for the kernel (any widths), by shape for torch."""
    groups: dict[tuple, list[int]] = {}
    for i, A in enumerate(As):
        use_triton = resolve_backend(backend, A) == "triton"
        if use_triton and backend == "auto" and A.shape[0] > kernel("ortho", "MAX_RANK"):
            use_triton = False  # ranks beyond the kernel's register tiles take the torch path
        width = None if use_triton else A.shape[1]
        groups.setdefault((use_triton, A.shape[0], width, A.dtype, A.device), []).append(i)
    return [(key[0], idx) for key, idx in groups.items()]


_CPU_STACK_BYTES = (1 << 16, 1 << 18)  # stack matrices smaller than 64 KiB, up to 256 KiB per call


def _cpu_chunks(idx: list[int], A: torch.Tensor) -> list[list[int]]:
    size = A.numel() * A.element_size()
    per = 1 if size >= _CPU_STACK_BYTES[0] else _CPU_STACK_BYTES[1] // size
    return [idx[c : c + per] for c in range(0, len(idx), per)]


def _stack(As: Sequence[torch.Tensor], chunk: list[int]) -> torch.Tensor:
    if len(chunk) == 1:
        return As[chunk[0]].detach().unsqueeze(0)  # a view: no copy
    return torch.stack([As[i].detach() for i in chunk])


def _host_bools(flags: list[torch.Tensor]) -> list[bool]:
    """Concatenate per-group ``(G,)`` bool tensors and bring them to the host in one transfer."""
    if not flags:
        return []
    return torch.cat([f.to(flags[0].device) for f in flags]).tolist()


def _torch_orthonormal_rows(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``reference.orthonormal_rows`` (the spec, same steps), plus what the checks need.

    Returns ``(Q, diag, norms, ok)``: Q ``(G, r, d)`` in batch's dtype (rows contiguous); ``diag(R)``
    ``(G, r)``; the row norms ``‖a_k‖ = ‖R[:, k]‖`` ``(G, r)`` (fp64 over r×r: no overflow, no pass
    over A); ok ``(G,)``: A's fp32 row norms are finite (False also when they overflow).
    """
    A = batch.to(work_dtype(batch.dtype))
    Q, R = torch.linalg.qr(A.transpose(-1, -2), mode="reduced")  # Q (G, d, r), R (G, r, r)
    diag = torch.diagonal(R, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(Q.dtype)  # a zero sign counts as +1
    # Q is column-major per matrix, so its transpose is row-major: sign-fix the rows there
    Q = (Q.transpose(-1, -2) * signs.unsqueeze(-1)).to(batch.dtype)
    norms = torch.linalg.vector_norm(R, dim=-2, dtype=torch.float64)
    return Q, diag, norms, torch.linalg.vector_norm(A, dim=-1).isfinite().all(dim=-1)


def _dependent(diag: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``(G,)`` bool: some row has ``|R_kk| <= DEPENDENT_ROW_TOL ‖a_k‖`` (rank-deficient A)."""
    return (diag.abs() <= DEPENDENT_ROW_TOL * norms).any(dim=1)


def _warn_rank_deficient(deficient: list[bool], names: list[str]) -> None:
    # QR completes a rank-deficient A with orthonormal directions of its own choosing: correct, but
    # the user's adapter had fewer independent rows than r, which usually means a bug upstream.
    for name, flag in zip(names, deficient):
        if flag:
            warnings.warn(f"{name}: lora_A is rank-deficient; completed to orthonormal rows", stacklevel=3)


def project_out(U: torch.Tensor, Q: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``U − (U Qᵀ) Q`` in fp32: U's rows without their component in the row space of orthonormal Q.

    Args:
        U: ``(k, d)`` or a batch ``(G, k, d)``. Q: ``(r, d)`` or ``(G, r, d)``, rows orthonormal.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (one launch for the whole batch).

    Returns:
        U's shape and dtype.

    Raises:
        ValueError: when U and Q disagree on d or on the batch.
    """
    same_batch = U.dim() == Q.dim() and U.shape[:-2] == Q.shape[:-2] and U.shape[-1] == Q.shape[-1]
    if U.dim() not in (2, 3) or not same_batch:
        raise ValueError(f"U {tuple(U.shape)}, Q {tuple(Q.shape)}: need (k, d), (r, d) or batches of them")
    if resolve_backend(backend, U) == "triton":
        return kernel("ortho", "project_out")(U, Q)
    return _project_out_torch(U, Q)


def project_out_all(
    Us: Sequence[torch.Tensor], Qs: Sequence[torch.Tensor], backend: str = "auto"
) -> list[torch.Tensor]:
    """``project_out`` for every layer of a model: one batched call per shape group.

    Args:
        Us: ``(k, d)`` matrices (updates, gradients). Qs: the matching orthonormal ``(r, d)`` bases.

    Returns:
        A list with ``U_i − (U_i Q_iᵀ) Q_i``, shapes and dtypes of the Us.
    """
    if len(Us) != len(Qs):
        raise ValueError(f"{len(Us)} matrices but {len(Qs)} bases")
    out: list[torch.Tensor | None] = [None] * len(Us)
    keys: dict[tuple, list[int]] = {}
    for i, (U, Q) in enumerate(zip(Us, Qs)):
        keys.setdefault((tuple(U.shape), tuple(Q.shape), U.dtype, Q.dtype, U.device), []).append(i)
    for idx in keys.values():
        P = project_out(torch.stack([Us[i] for i in idx]), torch.stack([Qs[i] for i in idx]), backend)
        for j, i in enumerate(idx):
            out[i] = P[j]
    return out  # type: ignore[return-value]

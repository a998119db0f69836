"""Backend dispatch: the public functional API of mbf.

CUDA tensors take the Triton kernels of ``mbf.kernels``; CPU tensors take the PyTorch path;
``backend="triton"|"torch"`` forces one. The PyTorch path of ``lora_linear`` is a hand-written
``autograd.Function`` (saves x and S only, joins the LoRA term to the base GEMM's output with one
``addmm``) whose math is exactly ``mbf.reference.lora_linear``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mbf import reference
from mbf.reference import apply_dropout

__all__ = [
    "lora_linear",
    "lora_linear_nf4",
    "orthonormal_rows",
    "project_out",
    "project_out_all",
    "resolve_backend",
    "time_aware_merge_",
]

BACKENDS = ("auto", "torch", "triton")
# The fused kernel pads r into one tile; above this rank "auto" keeps the torch path on CUDA too.
MAX_FUSED_RANK = 128

# Which issue brings which kernel: named in the error until the kernel exists.
_CAPABILITIES = {
    "lora": "the fused LoRA linear Triton kernel",
    "ortho": "the batched orthonormalisation Triton kernel",
    "merge": "the batched time-aware merge Triton kernel",
}


def _kernel(module: str, name: str):
    """Import ``mbf.kernels.<module>.<name>`` lazily; NotImplementedError if it is not built."""
    try:
        mod = importlib.import_module(f"mbf.kernels.{module}")
        return getattr(mod, name)
    except (ImportError, AttributeError) as err:
        what = _CAPABILITIES[module]
        raise NotImplementedError(f"backend='triton': {what} is not available ({err})") from err


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """``"torch"`` or ``"triton"`` for these tensors: auto picks Triton for CUDA tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "triton" if any(t is not None and t.is_cuda for t in tensors) else "torch"


class _TorchLoRALinear(torch.autograd.Function):
    """``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ`` with a hand-written backward; W0, b, B_m stay frozen.

    The LoRA branch runs in the adapter's dtype (fp32 adapters over a 16-bit model: the branch and
    the adapter gradients keep fp32 precision, as PEFT's autocast adapters do); the base GEMM and
    the output stay in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, merged_B, lam, dropout, seed):
        ct = A.dtype  # compute dtype of the LoRA branch
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        xa = apply_dropout(x2.to(ct), dropout, seed)
        S = xa @ A.T  # (M, r)
        B_eff = B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)  # (out, r)
        out = F.linear(x2, weight, bias)  # (M, out)
        if ct == out.dtype:
            out.addmm_(S, B_eff.T, alpha=scaling)  # the LoRA term joins the base output in one op
        else:
            out.add_((S @ B_eff.T).mul_(scaling).to(out.dtype))
        ctx.save_for_backward(x2, S, weight, A, B, merged_B)
        ctx.scaling, ctx.lam, ctx.dropout, ctx.seed = scaling, lam, dropout, seed
        ctx.x_shape, ctx.has_merged = x.shape, merged_B is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, S, weight, A, B, merged_B = ctx.saved_tensors
        s, lam, ct = ctx.scaling, ctx.lam, A.dtype
        dY2 = dY.reshape(-1, dY.shape[-1])  # (M, out)
        dYc = dY2.to(ct)
        B_eff = B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)
        dS = dYc @ B_eff  # (M, r)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            lora_dx = dS @ A  # (M, in)
            if ctx.dropout > 0.0:
                lora_dx = apply_dropout(lora_dx, ctx.dropout, ctx.seed)  # the mask is linear: reapply it
            dx = (dY2 @ weight.to(dY2.dtype)).add_(lora_dx.to(dY2.dtype), alpha=s).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            xa = apply_dropout(x2.to(ct), ctx.dropout, ctx.seed)
            dA = (dS.T @ xa).mul_(s).to(A.dtype)
        if ctx.needs_input_grad[4]:
            # ∂B_eff/∂B = λ when the merged B is in play
            dB = (dYc.T @ S).mul_(s * (lam if ctx.has_merged else 1.0)).to(B.dtype)
        return dx, None, None, dA, dB, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merged_B: torch.Tensor | None = None,
    lam: float = 1.0,
    *,
    dropout: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear ``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ``; see ``mbf.reference.lora_linear``.

    Args:
        x: ``(..., in)``. weight: ``(out, in)``, frozen. bias: ``(out,)`` or None.
        A: ``(r, in)``. B: ``(out, r)``. merged_B: ``(out, r)`` or None.
        scaling: ``alpha / r``. lam: λ, with ``B_eff = merged_B + λ (B − merged_B)``.
        dropout: probability on the adapter input. seed: dropout mask seed (random when None).
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to x, A and B.

    Raises:
        ValueError: on mismatched shapes or a dropout outside [0, 1).
    """
    _check_lora_shapes(x, weight, bias, A, B, merged_B)
    seed = _dropout_seed(dropout, seed)
    frozen = [t for t in (weight, bias, merged_B) if t is not None]
    if any(t.requires_grad for t in frozen):
        # a trainable base is outside the fused paths' contract: let autograd do the spec.
        return reference.lora_linear(x, weight, bias, A, B, scaling, merged_B, lam, dropout, seed)
    chosen = resolve_backend(backend, x)
    if chosen == "triton" and (backend == "triton" or A.shape[0] <= MAX_FUSED_RANK):
        fn = _kernel("lora", "lora_linear")
        A, B, merged_B = _as_dtype(x.dtype, A, B, merged_B)  # the kernel's tiles share x's dtype
        return fn(x, weight, bias, A, B, scaling, merged_B, lam, dropout, seed)
    return _TorchLoRALinear.apply(x, weight, bias, A, B, float(scaling), merged_B, float(lam), dropout, seed)


def _dropout_seed(dropout: float, seed: int | None) -> int | None:
    """Validate the dropout probability; draw the mask's seed from torch's generator when needed."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout {dropout} must be in [0, 1)")
    if dropout > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return seed


def _as_dtype(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Autograd-aware casts (a no-op for tensors already in ``dtype``)."""
    return [None if t is None else t.to(dtype) for t in tensors]


def _check_lora_shapes(x, weight, bias, A, B, merged_B) -> None:
    out_f, in_f = weight.shape
    r = A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {in_f}")
    if A.shape != (r, in_f):
        raise ValueError(f"A has shape {tuple(A.shape)}, expected ({r}, {in_f})")
    if B.shape != (out_f, r):
        raise ValueError(f"B has shape {tuple(B.shape)}, expected ({out_f}, {r})")
    if merged_B is not None and merged_B.shape != B.shape:
        raise ValueError(f"merged_B has shape {tuple(merged_B.shape)}, expected {tuple(B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")


def _group_by_shape(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    return groups


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
            Qs, status = _kernel("ortho", "orthonormal_rows_many")(
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
        if use_triton and backend == "auto" and A.shape[0] > _kernel("ortho", "MAX_RANK"):
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
    A = batch.to(reference._qr_dtype(batch.dtype))
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
        return _kernel("ortho", "project_out")(U, Q)
    return reference.project_out(U, Q)


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
            _kernel("merge", "time_aware_merge_")(list(merged_Bs), [f.detach() for f in ft_Bs], lam)
            return
        groups: dict[tuple, list[int]] = {}
        for i, (m, f) in enumerate(zip(merged_Bs, ft_Bs)):
            groups.setdefault((m.dtype, f.dtype, m.device), []).append(i)
        for (m_dtype, _, _), idx in groups.items():
            ct = reference._qr_dtype(m_dtype)
            ms = [merged_Bs[i] for i in idx]
            work = ms if m_dtype == ct else [m.to(ct) for m in ms]  # fp32 math for half storage
            torch._foreach_lerp_(work, [ft_Bs[i].detach().to(ct) for i in idx], float(lam))
            if work is not ms:
                torch._foreach_copy_(ms, work)


def lora_linear_nf4(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merged_B: torch.Tensor | None = None,
    lam: float = 1.0,
    *,
    dropout: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
    path: str = "auto",
) -> torch.Tensor:
    """``lora_linear`` over a 4-bit NF4 base weight (QLoRA); the math of ``mbf.reference.lora_linear``
    with ``W0 = mbf.quant.dequantize_nf4(weight)``.

    Args:
        weight: an ``mbf.quant.NF4Weight`` (``(out, in)``, bitsandbytes' storage); never saved for backward.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` (dequantise with torch) or ``"triton"``.
        path: with Triton, ``"fused"`` (dequantise inside the GEMM tiles), ``"dequant"`` (one dequant
            pass + cuBLAS) or ``"auto"`` (by token count: ``mbf.kernels.nf4.choose_path``).
        Others as ``lora_linear``.

    Raises:
        ValueError: on mismatched shapes, a dropout outside [0, 1) or x on another device.
        RuntimeError: an NF4 weight on a device that cannot run it.
    """
    from mbf import quant

    _check_lora_shapes(x, weight, bias, A, B, merged_B)
    seed = _dropout_seed(dropout, seed)
    be = resolve_backend(backend, x)
    return quant.nf4_lora_linear(x, weight, bias, A, B, scaling, merged_B, lam, dropout, seed, be, path)

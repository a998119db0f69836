"""The specification: pure-PyTorch twins of every kernel in ``mbf.kernels``, for the tests only.

Every function here is short and obvious on purpose: float64, unbatched where it can be, the textbook
formula. Tests compare the fast paths (``mbf.functional``, ``mbf.kernels``, the strategies' batched steps)
against these functions run in float64; the package never imports this module at run time (its runtime
math lives in ``mbf.closed_form`` and ``mbf.functional``). The method's equations (SLAO, "Merge before
Forget", Qiao & Mahdavi, ICLR 2026):

    y      = x W0ᵀ + b + s · (drop(x) Aᵀ) B_effᵀ,     s = alpha / r
    B_eff  = B_m + λ (B − B_m)        (or B when there is no merged B)
    Q R    = qr(Aᵀ), diag(R) ≥ 0      A_new = Qᵀ    (task i ≥ 2 init, fp32)
    B_m,i  = B_m,i-1 + λ(i) (B_ft,i − B_m,i-1),   λ(i) = 1/√i  (``mbf.closed_form.lam_schedule``)

and the per-task merges SLAO is compared with, over task vectors ``τ_t = s B_t A_t`` (the full
``ΔW`` of task t's LoRA): task arithmetic ``λ Σ_t τ_t`` and TIES (trim, elect sign, disjoint mean);
and sketch-merge's steps (its sketch, its weight, its bounded merge). InfLoRA's closed-form steps and the
λ schedules are defined once, in ``mbf.closed_form``, and tested against hand-computed values.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_dropout",
    "bounded_merge",
    "dropout_keep_mask",
    "dropout_threshold",
    "lora_linear",
    "orthonormal_rows",
    "philox_randint",
    "philox_randint4x",
    "project_out",
    "sketch_update",
    "sketch_weight",
    "ties_merge",
    "ties_trim",
    "task_arithmetic",
    "time_aware_merge",
]

# Philox-4x32-10 constants, exactly those of triton.language.random, so that a dropout mask drawn
# here equals the one a Triton kernel draws with tl.randint(seed, offset).
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_U32 = 0xFFFFFFFF


def _mul_u32(a: torch.Tensor | int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of two uint32 values held in int64.

    Split into 16-bit limbs so no intermediate overflows int64.
    """
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    mid = a1 * b0 + a0 * b1  # < 2**33
    low = a0 * b0 + ((mid & 0xFFFF) << 16)  # < 2**33
    high = a1 * b1 + (mid >> 16) + (low >> 32)
    return high & _U32, low & _U32


def philox_randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offsets)`` of Triton (Philox 4x32, 10 rounds) in plain PyTorch.

    Args:
        seed: integer in [0, 2**63).
        offsets: int64 tensor of non-negative counters (any shape; the high 32 bits go in word 1).

    Returns:
        Four int64 tensors of the offsets' shape holding the four uint32 output words.
    """
    c0 = offsets.to(torch.int64) & _U32
    c1 = (offsets.to(torch.int64) >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_u32(_PHILOX_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first word of ``philox_randint4x``."""
    return philox_randint4x(seed, offsets)[0]


def dropout_keep_mask(shape: tuple[int, int], p: float, seed: int, device=None) -> torch.Tensor:
    """Keep-mask of LoRA dropout over a 2-D ``[M, K]`` input, regenerated from ``seed``.

    One Philox call serves four columns: element (m, k) is kept iff word ``k mod 4`` of
    ``philox_randint4x(seed, m * ceil(K / 4) + k // 4)`` is ``>= floor(p * 2**32)``. An integer
    comparison, so the Triton kernels (``tl.randint4x``) and this twin agree bit for bit.
    """
    m, k = shape
    quads = (k + 3) // 4
    counters = torch.arange(m * quads, device=device, dtype=torch.int64).view(m, quads)
    words = torch.stack(philox_randint4x(seed, counters), dim=-1).view(m, 4 * quads)[:, :k]  # k -> word k%4
    return words >= dropout_threshold(p)


def apply_dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """LoRA dropout of a 2-D ``[M, K]`` tensor: ``x2 · keep / (1 − p)`` with ``dropout_keep_mask``."""
    if p == 0.0:
        return x2
    keep = dropout_keep_mask(tuple(x2.shape), p, seed, device=x2.device)
    return x2 * keep.to(x2.dtype) / (1.0 - p)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a Philox draw drops an element (p in [0, 1))."""
    return min(int(math.floor(p * 2**32)), 2**32 - 1)


def _rounded(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back (the identity for None): a rounding point of the policy.

    The rounding is a constant to autograd (its gradient is the identity): gradients are the exact
    algebra's, not rounded to ``dtype`` on their way back."""
    return t if dtype is None else t + (t.to(dtype).to(t.dtype) - t).detach()


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, merged_B: torch.Tensor | None = None, lam: float = 1.0,
                *, dropout: float = 0.0, seed: int | torch.Tensor | None = None,
                compute_dtype: torch.dtype | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """``x W0ᵀ + b + scaling · (drop(x) Aᵀ) B_effᵀ`` with ``B_eff = merged_B + lam (B − merged_B)``.

    The numerical policy every backend follows (``mbf.kernels.policy`` decides it per call), with
    ``ct`` the LoRA branch's compute dtype (the promotion of x's and the adapters' dtypes) and
    ``od`` the output's (x's), ``round_t`` a rounding to t::

        B_eff = round_ct(B_m + λ (B − B_m))        S = round_ct(drop(x) Aᵀ)
        C     = round_od(b + round_od(S) · round_od(s · B_eff)ᵀ)       (the base GEMM's addend)
        y     = round_od(x W0ᵀ + C)

    and in the backward ``dS = round_ct(dY B_eff)``, ``dX = round_od(dY W0 + C')`` with
    ``C' = round_od(round_od(dS) · round_od(s/(1−p) · A)) ⊙ keep``, dA and dB in ct. Run in
    float64 with ``compute_dtype`` / ``out_dtype`` given, this function rounds where the policy
    rounds (the forward); without them it is the exact algebra.

    Args:
        x: ``(..., in)``.
        weight: frozen base ``W0``, ``(out, in)``.
        bias: ``(out,)`` or None.
        A: ``(r, in)``; B: ``(out, r)``; merged_B: ``(out, r)`` or None (then ``B_eff = B``).
        scaling: ``alpha / r``. lam: the time-aware merge coefficient λ.
        dropout: LoRA dropout probability on the adapter branch's input. seed: its Philox key
            (``dropout_keep_mask``; drawn from torch's generator when None).
        compute_dtype, out_dtype: the policy's ``ct`` and ``od`` to round to (None: no rounding).

    Returns:
        ``(..., out)`` in x's dtype.
    """
    wt = torch.promote_types(x.dtype, A.dtype)  # the working dtype (float64 in the tests)
    B_eff = B if merged_B is None else merged_B + lam * (B - merged_B)
    B_eff = _rounded(B_eff.to(wt), compute_dtype)
    xa = x.to(wt)
    if dropout > 0.0:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        xa = apply_dropout(xa.reshape(-1, x.shape[-1]), dropout, seed).reshape(x.shape)
    S = _rounded(xa @ A.to(wt).T, compute_dtype)
    bias = torch.zeros((), dtype=wt) if bias is None else bias.to(wt)
    C = bias + S @ (scaling * B_eff).T  # the exact addend, whose gradients autograd takes
    if out_dtype is not None:  # the policy's value of it (a constant to autograd)
        C_od = _rounded(bias + _rounded(S, out_dtype) @ _rounded(scaling * B_eff, out_dtype).T, out_dtype)
        C = C + (C_od - C).detach()
    y = torch.nn.functional.linear(x.to(wt), weight.to(wt)) + C
    return y.to(x.dtype)


def _qr_dtype(dtype: torch.dtype) -> torch.dtype:
    # QR and merges run in fp32 whatever the parameter dtype; float64 stays float64 for the tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


def orthonormal_rows(A: torch.Tensor) -> torch.Tensor:
    """SLAO step 2: ``Qᵀ`` of the reduced QR of ``Aᵀ``, columns of Q signed so ``diag(R) ≥ 0``.

    Args:
        A: ``(..., r, d)`` with ``r <= d``; leading dims are a batch.

    Returns:
        ``(..., r, d)`` in A's dtype, rows orthonormal and spanning A's row space (for full rank A).
    """
    Q, R = torch.linalg.qr(A.to(_qr_dtype(A.dtype)).transpose(-1, -2), mode="reduced")
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    signs = torch.where(d < 0, -1.0, 1.0).to(Q.dtype)  # a zero sign counts as +1
    return (Q * signs.unsqueeze(-2)).transpose(-1, -2).to(A.dtype)


def project_out(U: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``U − Σ_j (U q_j) q_jᵀ``: each row of ``U (..., k, d)`` minus its component along every row ``q_j`` of
    orthonormal ``Q (..., r, d)``, one basis vector at a time (the coefficients all taken from U)."""
    ct = _qr_dtype(U.dtype)
    u, out = U.to(ct), U.to(ct)
    for j in range(Q.shape[-2]):
        q = Q[..., j : j + 1, :].to(ct)  # (..., 1, d)
        out = out - (u * q).sum(dim=-1, keepdim=True) * q
    return out.to(U.dtype)


def time_aware_merge(merged_B: torch.Tensor, ft_B: torch.Tensor, lam: float) -> torch.Tensor:
    """``merged_B + lam (ft_B − merged_B)`` computed in fp32, returned in merged_B's dtype."""
    ct = _qr_dtype(merged_B.dtype)
    m = merged_B.to(ct)
    return (m + lam * (ft_B.to(ct) - m)).to(merged_B.dtype)


# -- per-task LoRA merging (the baselines of mbf.strategies.task_merge) --------------------------------


def task_arithmetic(deltas: torch.Tensor, lam: float) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic"):
    ``ΔW = λ Σ_t τ_t`` over the task vectors ``deltas (T, ...)``; returns ``(...)``."""
    return lam * deltas.sum(dim=0)


def ties_trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1, trim: each task vector (a row of ``deltas (T, ...)``, flattened) keeps its
    ``k = max(1, round(density · N))`` largest magnitudes (values tied with the k-th kept too), the
    rest set to 0."""
    flat = deltas.reshape(deltas.shape[0], -1)
    k = max(1, round(density * flat.shape[1]))
    kth = flat.abs().topk(k, dim=1).values[:, -1:]  # (T, 1): the k-th largest magnitude of each row
    return torch.where(flat.abs() >= kth, flat, torch.zeros_like(flat)).reshape(deltas.shape)


def ties_merge(deltas: torch.Tensor, density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al., NeurIPS 2023), Algorithm 1, over task vectors ``deltas (T, ...)``:

        τ̂_t = trim(τ_t, density)                  (keep each task's top-k% magnitudes)
        γ   = sgn(Σ_t τ̂_t)                        (elect the sign of every entry)
        A   = {t : sgn(τ̂_t) = γ, τ̂_t ≠ 0}         (the tasks that agree with it)
        ΔW  = λ · Σ_{t∈A} τ̂_t / |A|               (disjoint mean; 0 where A is empty)

    An entry whose trimmed values sum to exactly 0 gets γ = 0 and the value 0, as Algorithm 1 has it
    (the paper's code instead gives such entries the sign of the majority of all elected signs).
    Returns ``(...)`` in ``deltas``' dtype.
    """
    trimmed = ties_trim(deltas, density)
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return lam * (trimmed * agree).sum(dim=0) / count


# Sketch-merge (this package's extension, mbf.strategies.sketch): InfLoRA's design against a bounded
# sketch of past inputs, and every past task in one merged adapter of rank ≤ R.


def _eig_desc(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(sym)
    return vals.flip(0).clamp(min=0), vecs.flip(1)


def sketch_update(
    cov: torch.Tensor, memory: torch.Tensor, energy: torch.Tensor, total: float, k: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The sketch after a task: ``(M, e)`` ← the top-k eigenpairs (positive ones) of ``M diag(e) Mᵀ + C``,
    ``τ ← τ + tr C``. Returns ``(M (in, k'), e (k',), τ)`` with ``k' ≤ k``."""
    S = (memory * energy) @ memory.T + cov
    vals, vecs = _eig_desc(S)
    keep = min(k, int((vals > 0).sum()))
    return vecs[:, :keep], vals[:keep], total + float(torch.trace(cov))


def sketch_weight(memory: torch.Tensor, energy: torch.Tensor, total: float) -> torch.Tensor:
    """``G = M diag(√e) Mᵀ + √δ (I − M Mᵀ)``, ``δ = (τ − Σ e) / (in − k)``: the square root of the
    covariance the sketch stands for, its discarded energy spread evenly over the rest (δ floored at
    ``e_max · 1e-6`` so that G is invertible)."""
    n, k = memory.shape
    eye = torch.eye(n, dtype=memory.dtype)
    if k == 0 or total <= 0:
        return eye
    delta = max((total - float(energy.sum())) / (n - k), float(energy.max()) * 1e-6, 1e-30)
    inside = memory @ torch.diag(energy.clamp(min=delta).sqrt()) @ memory.T
    return inside + delta**0.5 * (eye - memory @ memory.T)


def bounded_merge(delta: torch.Tensor, G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``D̂ = P_B P_A`` minimising ``‖(D − D̂) G‖_F`` (Eckart–Young on ``D G``, mapped back by
    ``G⁻¹``), factors balanced (``P_B = U Σ^½``, ``P_A = Σ^½ Vᵀ G⁻¹``); singular values below 1e-10 of the
    largest are dropped. Returns ``(P_A (k, in), P_B (out, k))``, ``k ≤ rank``."""
    U, S, Vh = torch.linalg.svd(delta @ G, full_matrices=False)
    keep = min(rank, int((S > S[0] * 1e-10).sum()))
    root = S[:keep].sqrt()
    return (root[:, None] * Vh[:keep]) @ torch.linalg.inv(G), U[:, :keep] * root

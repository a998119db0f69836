"""``lora_linear``: the LoRA linear over any base, and the one autograd Function behind its torch paths.

``y = x W0ᵀ + b + s · (drop(x) Aᵀ) B_effᵀ`` with ``B_eff = B_m + λ (B − B_m)`` (``mbf.reference``
is the spec). CUDA tensors over a dense W0 take the fused Triton op (``mbf.kernels.lora_op``);
everything else runs ``LoRALinearFunction``, which writes the LoRA algebra once and reads W0
through a base object (``mbf.functional.bases``): dense, or NF4 read by torch, by the one-pass
dequant kernel or by the fused NF4 kernels.

Dropout masks come in two families (``mbf.reference.RNGS``): the fused Triton op draws Philox from
an integer seed inside its tiles and regenerates it in the backward; ``LoRALinearFunction`` takes a
boolean keep mask drawn once by ``torch.rand`` (``reference.torch_keep_mask`` for a seed, torch's
global generator without one) and keeps it for the backward: no ``.item()``, so no graph break
under ``torch.compile``, and one vectorised draw instead of ten Philox rounds in int64, twice.
"""

from __future__ import annotations

import torch

from mbf import reference
from mbf.functional import dispatch
from mbf.functional._backend import kernel, resolve_backend
from mbf.functional.bases import DenseBase, nf4_base
from mbf.kernels import interpreting
from mbf.nf4 import NF4Weight, dequantize_nf4

__all__ = ["MAX_FUSED_RANK", "LoRALinearFunction", "lora_linear", "lora_linear_nf4"]

# The fused kernel pads r into one register tile (mbf.kernels.lora_op.MAX_RANK); above this rank the
# torch path runs, with backend="triton" too (at 128 its (BLOCK, R_PAD) tiles spill on sm_90).
MAX_FUSED_RANK = 64


def _b_eff(B: torch.Tensor, merged_B: torch.Tensor | None, lam: float, ct: torch.dtype) -> torch.Tensor:
    """``B_m + λ (B − B_m)`` in ``ct`` (``torch.lerp``: exact at λ = 1), or B without a merged B."""
    return B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)


class LoRALinearFunction(torch.autograd.Function):
    """``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ`` with a hand-written backward; W0, b and B_m stay frozen.

    ``drop(x) = x ⊙ keep / (1 − p)`` with ``keep`` a boolean ``(M, in)`` mask (None: no dropout),
    drawn by the caller. Saved for backward: x, S and the mask (plus references to the parameters);
    the dropped input is one multiply, redone in the backward rather than held (4 bytes an element).
    The ``1 / (1 − p)`` rescale is folded into the small operands: S and the scaling of dx and dA.
    The LoRA branch runs in the adapter's dtype (fp32 adapters over a 16-bit base: the branch and
    the adapter gradients keep fp32, as PEFT's autocast adapters do); the base GEMMs and the
    output stay in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, A, B, base, bias, merged_B, scaling, lam, keep, dropout):
        ct = A.dtype  # compute dtype of the LoRA branch
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        S = _masked(x2.to(ct), keep) @ A.T  # (M, r)
        if keep is not None:
            S = S.mul_(1.0 / (1.0 - dropout))  # drop(x) Aᵀ: the rescale on the (M, r) product
        out = base.forward(x2, bias, S, _b_eff(B, merged_B, lam, ct), scaling)  # (M, out)
        ctx.save_for_backward(x2, S, A, B, merged_B, keep)
        ctx.base, ctx.scaling, ctx.lam, ctx.dropout = base, scaling, lam, dropout
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, S, A, B, merged_B, keep = ctx.saved_tensors
        s, ct = ctx.scaling, A.dtype
        s_drop = s if keep is None else s / (1.0 - ctx.dropout)  # s and the mask's rescale, for dx and dA
        dY2 = dY.reshape(-1, dY.shape[-1])  # (M, out)
        dYc = dY2.to(ct)
        dS = dYc @ _b_eff(B, merged_B, ctx.lam, ct)  # (M, r)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = ctx.base.grad_input(dY2, dS, A, s_drop, keep).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dA = (dS.T @ _masked(x2.to(ct), keep)).mul_(s_drop)  # (r, in)
        if ctx.needs_input_grad[2]:
            dB = (dYc.T @ S).mul_(s * (1.0 if merged_B is None else ctx.lam))  # ∂B_eff/∂B = λ
        return dx, dA, dB, None, None, None, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
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
    nf4_path: str = "auto",
    name: str | None = None,
) -> torch.Tensor:
    """Fused LoRA linear ``x W0ᵀ + b + s (drop(x) Aᵀ) B_effᵀ``; see ``mbf.reference.lora_linear``.

    Args:
        x: ``(..., in)``. weight: ``W0 (out, in)``, frozen: a dense tensor or an ``mbf.nf4.NF4Weight``
            (QLoRA; never saved for backward, re-read from its 4 bits). bias: ``(out,)`` or None.
        A: ``(r, in)``. B: ``(out, r)``. merged_B: ``(out, r)`` or None.
        scaling: ``alpha / r``. lam: λ, with ``B_eff = merged_B + λ (B − merged_B)``.
        dropout: probability on the adapter input. seed: the dropout mask's seed. The torch paths draw
            the mask with ``reference.torch_keep_mask(seed)``, or from torch's global generator when
            None; the fused Triton op draws Philox (``reference.dropout_keep_mask``) from the seed, or
            from one drawn from torch's generator when None.
        backend: ``"auto"`` (CUDA tensors over a dense W0: the fastest path measured for this GPU
            and shape, ``mbf.functional.dispatch``; NF4: Triton; CPU: torch), ``"torch"`` or
            ``"triton"`` (over a dense W0, ranks above ``MAX_FUSED_RANK`` still run the torch path).
        nf4_path: over an NF4 weight with Triton, ``"fused"`` (dequantise inside the GEMM tiles),
            ``"dequant"`` (one dequant pass + cuBLAS) or ``"auto"`` (``mbf.kernels.nf4.choose_path``).
        name: the layer's name, to start every error message with (``LoRALinear`` passes its own).

    Returns:
        ``(..., out)`` in x's dtype. Gradients flow to x, A and B.

    Raises:
        ValueError: on mismatched shapes, a dropout outside [0, 1), or an NF4 weight away from x.
        RuntimeError: an NF4 weight on a device its backend cannot run on.
    """
    where = f"{name}: " if name else ""
    _check_shapes(where, x, weight.shape, bias, A, B, merged_B)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}dropout {dropout} must be in [0, 1)")
    if backend == "auto" and x.is_cuda and not isinstance(weight, NF4Weight):  # measured: see dispatch.py
        backend = dispatch.auto_backend(
            x, weight, bias, A, B, scaling, merged_B, lam, dropout, run=lora_linear
        )
    chosen = resolve_backend(backend, x)
    is_nf4 = isinstance(weight, NF4Weight)
    if is_nf4:
        check_nf4_device(weight, x, chosen, where)
    frozen = [t for t in (None if is_nf4 else weight, bias, merged_B) if t is not None]
    if any(t.requires_grad for t in frozen):
        # a trainable base is outside the fused paths' contract: let autograd do the spec.
        W = dequantize_nf4(weight, x.dtype) if is_nf4 else weight
        return reference.lora_linear(x, W, bias, A, B, scaling, merged_B, lam, dropout, seed, rng="torch")
    if is_nf4:
        if chosen == "torch":
            nf4_path = "torch"
        elif nf4_path == "auto":
            nf4_path = kernel("nf4", "choose_path")(x.numel() // x.shape[-1])
        base = nf4_base(weight, nf4_path)
    elif chosen == "triton" and A.shape[0] <= MAX_FUSED_RANK:
        if dropout > 0.0 and seed is None:  # the kernels draw Philox from an integer seed
            seed = int(torch.randint(0, 2**62, ()).item())
        # the adapters go in as they are: fp32 adapters over a 16-bit base keep fp32 tiles and grads
        return kernel("lora_op", "lora_linear")(x, weight, bias, A, B, scaling, merged_B, lam, dropout, seed)
    else:
        base = DenseBase(weight)
    keep = keep_mask((x.numel() // x.shape[-1], x.shape[-1]), dropout, seed, x.device)
    return LoRALinearFunction.apply(x, A, B, base, bias, merged_B, float(scaling), float(lam), keep, dropout)


def lora_linear_nf4(x: torch.Tensor, weight: NF4Weight, *args, path: str = "auto", **kwargs) -> torch.Tensor:
    """``lora_linear`` over an NF4 weight with its Triton path named ``path`` (see ``nf4_path``)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"lora_linear_nf4 needs an mbf.nf4.NF4Weight, got {type(weight).__name__}")
    return lora_linear(x, weight, *args, nf4_path=path, **kwargs)


def keep_mask(
    shape: tuple[int, int], p: float, seed: int | None, device: torch.device
) -> torch.Tensor | None:
    """The torch paths' boolean keep mask ``(M, in)``, None without dropout.

    With a seed: ``reference.torch_keep_mask`` (a generator of its own: reproducible, and the
    same bits under ``torch.compile``, where the op ``mbf::torch_keep_mask`` keeps the generator,
    which dynamo cannot trace, out of the graph without breaking it). Without: torch's global
    generator, read inside the graph (no ``.item()``); inductor then draws with its own RNG, seeded
    from torch's, unless ``torch._inductor.config.fallback_random`` is set.
    """
    if p == 0.0:
        return None
    if seed is not None:
        return _seeded_keep_mask(shape[0], shape[1], p, seed, device)
    return torch.rand(shape, device=device) >= p


@torch.library.custom_op("mbf::torch_keep_mask", mutates_args=())
def _seeded_keep_mask(M: int, K: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    return reference.torch_keep_mask((M, K), p, seed, device)


@_seeded_keep_mask.register_fake
def _(M, K, p, seed, device):
    return torch.empty((M, K), dtype=torch.bool, device=device)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t ⊙ keep`` (a new tensor), or t itself without a mask."""
    return t if keep is None else t * keep


def _check_shapes(where: str, x, weight_shape, bias, A, B, merged_B) -> None:
    out_f, in_f = weight_shape
    r = A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"{where}x has {x.shape[-1]} features, weight expects {in_f}")
    if A.shape != (r, in_f):
        raise ValueError(f"{where}A has shape {tuple(A.shape)}, expected ({r}, {in_f})")
    if B.shape != (out_f, r):
        raise ValueError(f"{where}B has shape {tuple(B.shape)}, expected ({out_f}, {r})")
    if merged_B is not None and merged_B.shape != B.shape:
        raise ValueError(f"{where}merged_B has shape {tuple(merged_B.shape)}, expected {tuple(B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"{where}bias has shape {tuple(bias.shape)}, expected ({out_f},)")


def check_nf4_device(w: NF4Weight, x: torch.Tensor, backend: str, where: str = "") -> None:
    """Raise when ``w`` sits where ``backend`` cannot run it, or away from ``x``.

    Raises:
        RuntimeError: a device other than cpu / cuda, or Triton on a CPU without the interpreter.
        ValueError: ``x`` on another device than ``w``.
    """
    dev = w.device
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{where}NF4 weight on {dev} cannot run; mbf runs NF4 on cpu (torch) and cuda (Triton)"
        )
    if x.device != dev:
        raise ValueError(f"{where}input on {x.device} but the NF4 weight on {dev}; move one of them")
    if backend == "triton" and dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"{where}backend='triton' needs the NF4 weight on a CUDA device, it is on {dev}")

"""NF4 base weights in bitsandbytes' exact storage: quantise, dequantise, convert, and the QLoRA linear.

The layout (bitsandbytes ``quant_type="nf4"``, ``blocksize=64``, ``compress_statistics=True``):

    packed[i]   uint8, (out·in / 2,)   codes of the flattened row-major ``W[out, in]``; element 2i in
                                       the HIGH nibble, element 2i + 1 in the low nibble
    absmax[b]   uint8, (out·in / 64,)  per-64-block scale, itself quantised ("double quant"):
                absmax[b] = absmax_code[absmax_q[b]] · absmax_scale[b // 256] + absmax_offset
    W[j]        = NF4_CODE[code_j] · absmax[j // 64]        (fp32 math, cast to the compute dtype)

``absmax_code`` is bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map``), ``absmax_scale``
the fp32 absmax of each 256-block of centred scales and ``absmax_offset`` their mean. Storage is
0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes per weight. Without double quant (``BitsAndBytesConfig``'s
default) ``absmax`` is fp32 and the layout is otherwise the same.

A ``bnb.nn.Linear4bit`` converts zero-copy (:meth:`NF4Linear.from_bnb`: our buffers are views of its
``Params4bit`` and ``quant_state``); a dense ``nn.Linear`` is quantised by :func:`quantize_nf4`, whose
4-bit codes equal ``bitsandbytes.functional.quantize_4bit``'s. :func:`dequantize_nf4` is the
pure-PyTorch twin of the Triton kernels and is bit-exact to ``bitsandbytes.functional.dequantize_4bit``.

The QLoRA forward/backward (:class:`_NF4LoRALinear`) is one autograd Function for every path, so the
torch path (CPU) and the Triton paths share the LoRA algebra and differ only in how the base GEMMs
read W: dequantised by torch (CPU), by the one-pass Triton kernel feeding cuBLAS, or inside the fused
Triton GEMM (``mbf.kernels.nf4``). W is never saved for backward: it is re-read from its 4 bits.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbf import reference
from mbf.reference import apply_dropout

__all__ = [
    "NF4_CODE",
    "NF4Linear",
    "NF4Weight",
    "dequantize_nf4",
    "dynamic_map",
    "is_bnb_linear4bit",
    "nf4_lora_linear",
    "check_device",
    "quantize_nf4",
]

BLOCKSIZE = 64  # the only 4-bit blocksize the kernels read (one byte row of 32 per block)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantised absmax

# bitsandbytes.functional.get_4bit_type("nf4"): the 16 quantiles of N(0, 1) of QLoRA, as fp32.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_QLORA_HINT = "pip install mbf-lora[qlora]"


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): 256 sorted fp32 values.

    Computed exactly as bitsandbytes does (fp32 linspace and scaling, sorted).
    """
    data: list[float] = []
    for i in range(7):  # exponent 10**(i-6); 2**i fractions each, both signs
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()  # scaled in fp32, as bitsandbytes does
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one NF4 weight (views, never copies) and its logical shape.

    Attributes:
        packed: uint8 ``(out·in / 2,)``, two codes per byte, first element in the high nibble.
        absmax: ``(out·in / 64,)`` uint8 (double quant) or fp32 per-block scales.
        absmax_scale: fp32 ``(ceil(blocks / 256),)`` or None (no double quant).
        absmax_offset: fp32 0-d tensor or None.
        absmax_code: fp32 ``(256,)`` dynamic map or None.
        code: fp32 ``(16,)`` NF4 table.
        shape: ``(out, in)``. dtype: the compute / dequantisation dtype.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    absmax_code: torch.Tensor | None
    code: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_scales(self) -> torch.Tensor:
        """fp32 ``(blocks,)`` absmax of every 64-block, bit-exact to bitsandbytes' nested dequant.

        Three separate torch ops on purpose: a fused multiply-add would round differently.
        """
        if not self.double_quant:
            return self.absmax.float()
        scale = self.absmax_scale.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        out = self.absmax_code[self.absmax.long()] * scale
        return out + self.absmax_offset

    def nbytes(self) -> int:
        """Bytes of storage (the figure behind "≈ 0.52 bytes per weight")."""
        ts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset, self.absmax_code, self.code)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The twin of the kernels: ``W (out, in)`` in ``dtype`` (default ``w.dtype``), bit-exact to bnb.

    ``NF4_CODE[code] · absmax`` in fp32, then one cast, as ``bitsandbytes.functional.dequantize_4bit``.
    """
    out_f, in_f = w.shape
    q = torch.stack((w.packed >> 4, w.packed & 0xF), dim=-1).reshape(-1)[: out_f * in_f]  # high first
    vals = w.code[q.long()].view(-1, BLOCKSIZE) * w.block_scales().view(-1, 1)
    return vals.view(out_f, in_f).to(dtype or w.dtype)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True, name: str = "weight") -> NF4Weight:
    """Quantise a dense ``(out, in)`` weight to NF4, blocksize 64, as ``bnb.functional.quantize_4bit``.

    The 4-bit codes equal bitsandbytes' (its reference implementation: nearest NF4 value by midpoint
    bucketing of ``w · (1 / absmax)``); the double-quantised absmax uses the same midpoint rule on
    the dynamic map (bitsandbytes' CPU C kernel may pick the other neighbour within ~1e-6 of a
    midpoint; either code is valid storage and dequantises identically everywhere).

    Raises:
        ValueError: when ``in`` is not a multiple of 64 or the weight is not 2-D floating point.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{name}: expected a 2-D floating point weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    out_f, in_f = weight.shape
    if in_f % BLOCKSIZE:
        raise ValueError(f"{name}: in_features {in_f} must be a multiple of {BLOCKSIZE} for the NF4 kernels")
    dev = weight.device
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    blocks = weight.detach().float().reshape(-1, BLOCKSIZE)  # (out·in/64, 64)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, None, code, (out_f, in_f), weight.dtype)
    amap = dynamic_map(dev)
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = -n % NESTED_BLOCKSIZE
    chunks = F.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    scale2 = chunks.abs().amax(dim=1)
    s = (chunks * (1.0 / scale2.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)[:n]
    qa = torch.bucketize(s, (amap[:-1] + amap[1:]) / 2, out_int32=True).to(torch.uint8)
    return NF4Weight(packed, qa, scale2, offset, amap, code, (out_f, in_f), weight.dtype)


def _bitsandbytes():
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(f"bitsandbytes is not installed; it is needed here: {_QLORA_HINT}") from err


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked by its weight's class: no bitsandbytes import)."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def _from_bnb_param(param, name: str, compute_dtype: torch.dtype | None) -> NF4Weight:
    """Views of a quantised ``Params4bit``'s storage and ``quant_state`` (no copy)."""
    qs = param.quant_state
    if qs.quant_type != "nf4":
        raise ValueError(
            f"{name}: 4-bit quant_type {qs.quant_type!r} is not supported; use bnb_4bit_quant_type='nf4'"
        )
    if qs.blocksize != BLOCKSIZE:
        raise ValueError(f"{name}: 4-bit blocksize {qs.blocksize} is not supported; only {BLOCKSIZE}")
    if len(qs.shape) != 2 or qs.shape[1] % BLOCKSIZE:
        raise ValueError(
            f"{name}: weight shape {tuple(qs.shape)} needs in_features a multiple of {BLOCKSIZE}"
        )
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes repacked it in place for its CPU inference kernel; undo it the way bitsandbytes
        # does when it saves or moves the weight (a copy, with its absmax rounded through bf16).
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        warnings.warn(
            f"{name}: bitsandbytes had repacked this CPU weight for inference (bf16 absmax); converting it "
            "back to the standard NF4 layout (a copy, absmax re-quantised as bitsandbytes does)",
            stacklevel=3,
        )
        param.data, qs = _convert_weight_packed_for_cpu_inverse(param.data, qs)
        param.quant_state = qs
    packed = param.data.view(torch.uint8).reshape(-1)  # [(n+1)//2, 1] storage, any quant_storage dtype
    code = qs.code.float() if qs.code is not None else torch.tensor(NF4_CODE, device=packed.device)
    dtype = compute_dtype or qs.dtype
    if not qs.nested:
        return NF4Weight(packed, qs.absmax.float(), None, None, None, code, tuple(qs.shape), dtype)
    if qs.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{name}: nested absmax blocksize {qs.state2.blocksize} is not supported; only 256")
    offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device)
    return NF4Weight(
        packed, qs.absmax, qs.state2.absmax, offset, qs.state2.code, code, tuple(qs.shape), dtype
    )


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
        return cls(quantize_nf4(linear.weight, double_quant, name), linear.bias, name)

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
            w = quantize_nf4(param.data, param.compress_statistics, name)
            layer = cls(w if compute is None else _with_dtype(w, compute), linear.bias, name)
        else:
            layer = cls(_from_bnb_param(param, name, compute), linear.bias, name)
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
        bnb = _bitsandbytes()
        from bitsandbytes.functional import QuantState

        w = self.nf4
        state2 = None
        if w.double_quant:
            state2 = QuantState(
                absmax=w.absmax_scale, code=w.absmax_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
        qs = QuantState(
            absmax=w.absmax,
            shape=torch.Size(w.shape),
            code=w.code,
            blocksize=BLOCKSIZE,
            quant_type="nf4",
            dtype=w.dtype,
            offset=w.absmax_offset,
            state2=state2,
        )
        layer = bnb.nn.Linear4bit(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            compute_dtype=w.dtype,
            compress_statistics=w.double_quant,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            w.packed.view(-1, 1),
            requires_grad=False,
            quant_state=qs,
            blocksize=BLOCKSIZE,
            compress_statistics=w.double_quant,
            quant_type="nf4",
            bnb_quantized=True,
        )
        layer.bias = None if self.bias is None else nn.Parameter(self.bias.detach(), requires_grad=False)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh 16-bit (or ``dtype``) ``(out, in)`` copy of the weight."""
        return dequantize_nf4(self.nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        dq = "double-quant" if self.absmax_scale is not None else "fp32 absmax"
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize=64, {dq}"


def _with_dtype(w: NF4Weight, dtype: torch.dtype) -> NF4Weight:
    return NF4Weight(
        w.packed, w.absmax, w.absmax_scale, w.absmax_offset, w.absmax_code, w.code, w.shape, dtype
    )


# ---------------------------------------------------------------------------------------------------
# QLoRA linear: y = x Wᵀ + b + s (drop(x) Aᵀ) B_effᵀ with W read from its 4 bits, forward and dX.
# ---------------------------------------------------------------------------------------------------

PATHS = ("torch", "dequant", "fused")


def _dense(w: NF4Weight, dtype: torch.dtype, path: str) -> torch.Tensor:
    if path == "torch":
        return dequantize_nf4(w, dtype)
    from mbf.kernels import nf4 as knf4  # only the Triton paths need triton

    return knf4.nf4_dequantize(w.packed, w.block_scales(), w.code, w.shape, dtype)


class _NF4LoRALinear(torch.autograd.Function):
    """The QLoRA linear; ``path`` says how the base GEMMs read W (see the module docstring).

    The LoRA branch runs in the adapter's dtype (fp32 adapters: fp32 branch and gradients, as PEFT's
    QLoRA layer does); the fused kernels take their LoRA operands in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, w, bias, A, B, scaling, merged_B, lam, dropout, seed, path):
        ct, dt = A.dtype, x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        S = apply_dropout(x2.to(ct), dropout, seed) @ A.T  # (M, r)
        B_eff = B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)  # (out, r)
        if path == "fused":
            from mbf.kernels import nf4 as knf4

            Bm = None if merged_B is None else merged_B.to(dt)
            out = knf4.nf4_lora_forward(
                x2, w.packed, w.block_scales(), w.code, w.shape, bias, S.to(dt), B.to(dt), Bm, scaling, lam
            )
        else:
            W = _dense(w, dt, path)  # transient (out, in): freed before backward
            out = F.linear(x2, W, None if bias is None else bias.to(dt))
            if ct == dt:
                out.addmm_(S, B_eff.T, alpha=scaling)
            else:
                out.add_((S @ B_eff.T).mul_(scaling).to(dt))
        ctx.save_for_backward(x2, S, A, B, merged_B)
        ctx.w, ctx.path = w, path
        ctx.scaling, ctx.lam, ctx.dropout, ctx.seed = scaling, lam, dropout, seed
        ctx.x_shape, ctx.has_merged = x.shape, merged_B is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, S, A, B, merged_B = ctx.saved_tensors
        s, lam, p, ct = ctx.scaling, ctx.lam, ctx.dropout, A.dtype
        dY2 = dY.reshape(-1, dY.shape[-1])  # (M, out)
        dYc = dY2.to(ct)
        B_eff = B.to(ct) if merged_B is None else torch.lerp(merged_B.to(ct), B.to(ct), lam)
        dS = dYc @ B_eff  # (M, r)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            w, dt = ctx.w, dY2.dtype
            if ctx.path == "fused":
                from mbf.kernels import nf4 as knf4

                # the dropout mask sits on the LoRA term only: with dropout it is added outside the kernel
                dS_k = dS.to(dt) if p == 0 else None
                dx = knf4.nf4_lora_dx(dY2, w.packed, w.block_scales(), w.code, w.shape, dS_k, A.to(dt), s)
                if p > 0:
                    dx.add_(apply_dropout(dS @ A, p, ctx.seed).to(dt), alpha=s)
            elif ct == dt:
                # one GEMM with the LoRA term as its addend: the sum is rounded once, as in the fused kernel
                lora_dx = apply_dropout(dS @ A, p, ctx.seed)
                dx = torch.addmm(lora_dx, dY2, _dense(w, dt, ctx.path), beta=s)
            else:
                dx = (dY2 @ _dense(w, dt, ctx.path)).add_(apply_dropout(dS @ A, p, ctx.seed).to(dt), alpha=s)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dA = (dS.T @ apply_dropout(x2.to(ct), p, ctx.seed)).mul_(s).to(A.dtype)
        if ctx.needs_input_grad[4]:
            dB = (dYc.T @ S).mul_(s * (lam if ctx.has_merged else 1.0)).to(B.dtype)
        return dx, None, None, dA, dB, None, None, None, None, None, None


def check_device(w: NF4Weight, x: torch.Tensor, backend: str, name: str = "NF4 weight") -> None:
    """Raise when ``w`` sits where the chosen backend cannot run it, or away from ``x``.

    Raises:
        RuntimeError: a device other than cpu / cuda, or the Triton backend on a CPU without
            ``TRITON_INTERPRET=1``.
        ValueError: ``x`` on another device than ``w``.
    """
    dev = w.device
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{name}: NF4 weight on {dev} cannot run; mbf runs NF4 on cpu (torch) and cuda (Triton)"
        )
    if x.device != dev:
        raise ValueError(f"{name}: input on {x.device} but the NF4 weight on {dev}; move one of them")
    if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"{name}: backend='triton' needs the NF4 weight on a CUDA device, it is on {dev}")


def nf4_lora_linear(
    x: torch.Tensor,
    w: NF4Weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merged_B: torch.Tensor | None = None,
    lam: float = 1.0,
    dropout: float = 0.0,
    seed: int | None = None,
    backend: str = "torch",
    path: str = "auto",
) -> torch.Tensor:
    """``x Wᵀ + b + s (drop(x) Aᵀ) B_effᵀ`` over an NF4 W (shapes checked by the caller,
    ``mbf.functional.lora_linear_nf4``).

    Args:
        backend: ``"torch"`` (dequantise with torch) or ``"triton"``.
        path: with Triton, ``"fused"``, ``"dequant"`` or ``"auto"`` (``mbf.kernels.nf4.choose_path``).
    """
    check_device(w, x, backend)
    if bias is not None and bias.requires_grad:
        # a trainable bias is outside the fused path's contract: let autograd do the spec.
        return reference.lora_linear(
            x, dequantize_nf4(w, x.dtype), bias, A, B, scaling, merged_B, lam, dropout, seed
        )
    if backend == "torch":
        path = "torch"
    elif path == "auto":
        from mbf.kernels import nf4 as knf4

        path = knf4.choose_path(x.numel() // x.shape[-1], *w.shape)
    if path not in PATHS:
        raise ValueError(f"path {path!r} must be one of auto, {', '.join(PATHS)}")
    return _NF4LoRALinear.apply(x, w, bias, A, B, float(scaling), merged_B, float(lam), dropout, seed, path)

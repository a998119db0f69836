"""One LoRA (or QLoRA) linear per provider, ready to time: the cases of the kernel-level benchmarks.

``lora_case`` times the dense LoRA linear in mode ``fwd``, ``bwd`` or ``full`` (fwd + bwd). Providers:
the plain frozen linear ``floor`` (cuBLAS), ``peft`` (PEFT's LoRA with the adapters in the same dtype
as mbf's: like for like), mbf's paths ``mbf-torch`` (cuBLAS + the LoRA term as the GEMM's addend),
``mbf-triton`` (the fused kernels), ``mbf-hybrid`` (cuBLAS base GEMMs + Triton low-rank passes) and
``mbf-auto`` (what ``backend="auto"``'s measuring dispatch picks), and ``triton-gemm`` (fwd only: the
fused forward's base GEMM alone in Triton, ``mbf.bench.triton_gemm``). ``nf4_case`` times the QLoRA
linear, fwd + bwd (``floor`` = the 16-bit frozen linear, ``mbf-bf16``, ``mbf-nf4`` and its two forced paths
``mbf-nf4-fused`` / ``mbf-nf4-dequant``, ``peft-bnb4`` = PEFT over bitsandbytes).
x needs a gradient in every provider (as inside a network); W0 is frozen, so the floor's backward
is the dX GEMM alone. Used by ``bench/test_bench_lora.py``, ``bench/test_bench_nf4.py`` and the
one-go GPU run ``python -m mbf.bench.gpu``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mbf.bench.providers import bnb_nf4_linear, peft_lora
from mbf.bench.rows import FLOOR

__all__ = ["LORA_PROVIDERS", "MBF_PATHS", "NF4_PROVIDERS", "lora_case", "lora_flops", "nf4_case"]

LORA_PROVIDERS = (FLOOR, "peft", "mbf-torch", "mbf-triton", "mbf-auto")  # the floor first: the reference
MBF_PATHS = {"mbf-torch": "torch", "mbf-triton": "triton", "mbf-hybrid": "hybrid", "mbf-auto": "auto"}
NF4_PROVIDERS = (FLOOR, "mbf-bf16", "mbf-nf4", "mbf-nf4-fused", "mbf-nf4-dequant", "peft-bnb4")


def lora_flops(provider: str, mode: str, M: int, K: int, N: int, r: int) -> int:
    """Useful FLOPs: base GEMM 2MKN per pass; LoRA adds 2Mr(K+N) forward and 4Mr(K+N) backward."""
    lora = provider != FLOOR
    fwd = 2 * M * K * N + (2 * M * r * (K + N) if lora else 0)
    bwd = 2 * M * K * N + (4 * M * r * (K + N) if lora else 0)  # dX; dS, dB, dA (no dW0: frozen)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _lora_layer(provider: str, K: int, N: int, r: int, dtype: torch.dtype, adapter_dtype, device):
    """A callable x -> y for the provider, and its trainable tensors (whose .grad the timing resets)."""
    W = (torch.randn(N, K, device=device) / K**0.5).to(dtype)  # Llama linears have no bias
    if provider == FLOOR:
        return (lambda x: torch.nn.functional.linear(x, W)), []
    if provider == "triton-gemm":
        from mbf.bench.triton_gemm import triton_gemm

        return (lambda x: triton_gemm(x, W)), []
    A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype).requires_grad_()
    B = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype).requires_grad_()  # not the zero init
    if provider == "peft":
        linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        linear.weight.data.copy_(W)
        model = peft_lora(linear, r)
        proj = model.base_model.model.proj
        # PEFT keeps 16-bit bases' adapters in fp32 (its autocast_adapter_dtype); cast to match mbf's
        proj.lora_A["default"].to(adapter_dtype).weight.data.copy_(A.detach())
        proj.lora_B["default"].to(adapter_dtype).weight.data.copy_(B.detach())
        return model, [p for p in model.parameters() if p.requires_grad]
    from mbf import functional

    backend = MBF_PATHS[provider]
    if backend == "auto" and device.type != "cuda":  # the dispatch only routes CUDA tensors: ask it here

        def auto(x):
            chosen = functional.dispatch.auto_backend(
                x, W, None, A, B, 2.0, None, 1.0, 0.0, run=functional.lora_linear
            )
            return functional.lora_linear(x, W, None, A, B, 2.0, backend=chosen)

        return auto, [A, B]
    return (lambda x: functional.lora_linear(x, W, None, A, B, 2.0, backend=backend)), [A, B]


def _timed(mode: str, layer, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor]) -> Callable:
    leaves = [x, *params]

    def reset():
        for t in leaves:
            t.grad = None  # no gradient accumulation kernels in the timing

    if mode == "fwd":
        return lambda: layer(x)
    if mode == "bwd":
        y = layer(x)

        def bwd():
            reset()
            y.backward(dy, retain_graph=True)

        return bwd

    def full():
        reset()
        layer(x).backward(dy)

    return full


def lora_case(
    provider: str,
    K: int,
    N: int,
    M: int,
    r: int,
    mode: str,
    dtype: torch.dtype,
    device: str,
    adapter_dtype: torch.dtype | None = None,
) -> tuple[Callable[[], object], int]:
    """``(the callable to time, its useful FLOPs)`` for one dense LoRA case (adapters in
    ``adapter_dtype``, default the base's ``dtype``).

    Raises:
        ValueError: ``triton-gemm`` in a mode other than ``fwd``; an unknown backend.
    """
    if provider == "triton-gemm" and mode != "fwd":
        raise ValueError(f"provider triton-gemm is the forward GEMM alone; mode {mode!r} must be 'fwd'")
    torch.manual_seed(0)
    device = torch.device(device)
    layer, params = _lora_layer(provider, K, N, r, dtype, adapter_dtype or dtype, device)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    flops = lora_flops(FLOOR if provider == "triton-gemm" else provider, mode, M, K, N, r)
    return _timed(mode, layer, x, dy, params), flops


def _lora_over_nf4(base: nn.Module, r: int) -> nn.Module:
    """mbf's LoRALinear over ``base`` in NF4 (a dense linear quantised, a ``Linear4bit`` viewed zero-copy)."""
    import mbf

    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    mbf.inject(wrapper, mbf.LoRAConfig(r=r, alpha=2 * r, target_modules=("proj",), quantize="nf4"))
    return wrapper.proj


def _storage_bytes(layer: nn.Module) -> int:
    """Bytes of the base weight as stored (NF4: codes, absmax and their quantisation constants)."""
    tensors = [*layer.base.buffers(), *(p for p in layer.base.parameters() if not p.requires_grad)]
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4_case(
    provider: str, K: int, N: int, M: int, r: int, dtype: torch.dtype, device: str
) -> tuple[Callable[[], object], int, int]:
    """``(one fwd+bwd callable, its useful FLOPs, bytes of the base weight as stored)`` for a QLoRA case.

    Raises:
        ImportError: ``peft-bnb4`` without bitsandbytes.
    """
    import mbf
    from mbf import functional

    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.normal_(0, K**-0.5)
    base.requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    if provider == FLOOR:
        module, nbytes = base, base.weight.numel() * base.weight.element_size()
    elif provider == "mbf-bf16":
        module, nbytes = mbf.LoRALinear.from_linear(base, r=r, alpha=2 * r), base.weight.numel() * 2
    elif provider == "mbf-nf4":
        module = _lora_over_nf4(base, r)
        nbytes = _storage_bytes(module)
    elif provider.startswith("mbf-nf4-"):
        layer = _lora_over_nf4(base, r)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        w, path = layer.base.nf4, provider.rsplit("-", 1)[1]

        def module(inp):
            return functional.lora_linear_nf4(
                inp, w, None, layer.lora_A, layer.lora_B, layer.scaling, path=path
            )

        nbytes = _storage_bytes(layer)
    else:  # peft-bnb4
        q = bnb_nf4_linear(base, dtype)
        module = peft_lora(q, r, four_bit=True)
        # the same accounting as mbf's: mbf's zero-copy view of bnb's Params4bit and quant_state
        nbytes = _storage_bytes(_lora_over_nf4(q, r))

    def step() -> None:
        x.grad = None
        module(x).backward(dy)

    # fwd base GEMM 2·M·K·N + bwd dX GEMM of the same size; LoRA: S, the B term, dS, dB, dA, dX part
    flops = 4 * M * K * N + (0 if provider == FLOOR else 6 * M * r * (K + N))
    return step, flops, nbytes

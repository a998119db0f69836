"""Fused LoRA linear on CUDA: frozen base linear (the floor) vs PEFT vs mbf's torch and Triton paths.

Llama-3-8B linears (4096→4096, 4096→1024, 4096→14336, 14336→4096), M ∈ {512, 2048, 8192} tokens,
r ∈ {8, 16, 64}, bf16, modes fwd / bwd / full (fwd+bwd). x needs a gradient in every provider (as
inside a network); W0 is frozen, so the floor's backward is the dX GEMM alone. Each row records the
median ms (CUDA events, ``triton.testing.do_bench``), TFLOP/s, peak memory and ``ratio_to_floor``:
the frozen linear measured in the same run, same shape, M and mode. Rows go to
``bench/results/<device>-<date>.json``; ``python -m mbf.bench.plot`` draws them. It never asserts a speed.

Run: ``python -m pytest bench/test_bench_lora.py -q -s`` (skips without CUDA);
``-k "4096-4096 and M8192 and r16"`` picks the headline case.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbf.bench.providers import peft_lora
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import peak_memory, time_fn

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (in, out)
TOKENS = (512, 2048, 8192)
RANKS = (8, 16, 64)
MODES = ("fwd", "bwd", "full")
PROVIDERS = (FLOOR, "peft", "mbf-torch", "mbf-triton")  # the floor first: the others' reference
REFERENCES = {"lora_linear": FLOOR}
DTYPE = torch.bfloat16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the LoRA kernel benchmark needs CUDA")


def _flops(provider: str, mode: str, M: int, K: int, N: int, r: int) -> int:
    """Useful FLOPs: base GEMM 2MKN per pass; LoRA adds 2Mr(K+N) forward and 4Mr(K+N) backward."""
    lora = provider != FLOOR
    fwd = 2 * M * K * N + (2 * M * r * (K + N) if lora else 0)
    bwd = 2 * M * K * N + (4 * M * r * (K + N) if lora else 0)  # dX; dS, dB, dA (no dW0: frozen)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _layer(provider: str, K: int, N: int, r: int):
    """A callable x -> y for the provider, and its trainable tensors (whose .grad the timing resets)."""
    dev = torch.device("cuda")
    W = (torch.randn(N, K, device=dev) / K**0.5).to(DTYPE)  # Llama linears have no bias
    if provider == FLOOR:
        return (lambda x: torch.nn.functional.linear(x, W)), []
    A = (torch.randn(r, K, device=dev) / K**0.5).to(DTYPE).requires_grad_()
    B = (torch.randn(N, r, device=dev) / r**0.5).to(DTYPE).requires_grad_()  # random: not the zero init
    if provider == "peft":
        linear = nn.Linear(K, N, bias=False, device=dev, dtype=DTYPE)
        linear.weight.data.copy_(W)
        model = peft_lora(linear, r)
        proj = model.base_model.model.proj
        proj.lora_A["default"].weight.data.copy_(A.detach())
        proj.lora_B["default"].weight.data.copy_(B.detach())
        return model, [p for p in model.parameters() if p.requires_grad]
    from mbf import functional

    backend = "torch" if provider == "mbf-torch" else "triton"
    return (lambda x: functional.lora_linear(x, W, None, A, B, 2.0, backend=backend)), [A, B]


def _timed_fn(mode: str, layer, x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor]):
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


# the top decorator varies fastest: a case's floor is measured right beside its other providers
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("r", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("M", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
def test_bench_lora(provider, mode, r, M, shape, rows):
    K, N = shape
    torch.manual_seed(0)
    layer, params = _layer(provider, K, N, r)
    x = torch.randn(M, K, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=DTYPE)
    fn = _timed_fn(mode, layer, x, dy, params)
    t = time_fn(fn, "cuda")
    peak = peak_memory(fn, "cuda")
    case = dict(op="lora_linear", provider=provider, mode=mode, shape=f"{K}->{N}", M=M, r=r, dtype="bfloat16")
    flops = _flops(provider, mode, M, K, N, r)
    rows.append(timed_row(**case, device=device_name("cuda"), timing=t, flops=flops, peak_mem_bytes=peak))

"""Fused LoRA linear on CUDA: frozen base linear (the floor) vs PEFT vs mbf's torch and Triton paths and auto.

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

from mbf.bench.layers import LORA_PROVIDERS, lora_case
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import peak_memory, time_fn

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (in, out)
TOKENS = (512, 2048, 8192)
RANKS = (8, 16, 64)
MODES = ("fwd", "bwd", "full")
REFERENCES = {"lora_linear": FLOOR}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the LoRA kernel benchmark needs CUDA")


# the top decorator varies fastest: a case's floor is measured right beside its other providers
@pytest.mark.parametrize("provider", LORA_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("r", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("M", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}")
def test_bench_lora(provider, mode, r, M, shape, rows):
    K, N = shape
    fn, flops = lora_case(provider, K, N, M, r, mode, torch.bfloat16, "cuda")
    t = time_fn(fn, "cuda")
    peak = peak_memory(fn, "cuda")
    case = dict(op="lora_linear", provider=provider, mode=mode, shape=f"{K}->{N}", M=M, r=r, dtype="bfloat16")
    rows.append(timed_row(**case, device=device_name("cuda"), timing=t, flops=flops, peak_mem_bytes=peak))

"""CPU LoRA linear: frozen base (the floor) vs PEFT's LoRA vs mbf's torch path, fwd+bwd, fp32.

The shape is SmolLM2-135M's up_proj (576 -> 1536) at 2048 tokens, r = 16: the CPU path is a
product too. Run: ``python -m pytest bench/test_bench_lora_cpu.py -q -s``. Measures and writes
rows to ``bench/results/<device>-<date>.json``; it never asserts a speed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mbf.bench.providers import peft_lora
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import time_fn

IN_F, OUT_F, M, R = 576, 1536, 2048, 16
PROVIDERS = (FLOOR, "peft", "mbf-torch")  # the floor first: the others' reference
REFERENCES = {"lora_linear": FLOOR}


def _module(provider: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(IN_F, OUT_F)
    if provider == FLOOR:
        base.requires_grad_(False)
        return base
    if provider == "peft":
        return peft_lora(base, R)
    import mbf

    return mbf.LoRALinear.from_linear(base, r=R, alpha=2 * R, backend="torch")


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    module(x).backward(dy)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_lora_cpu_fwd_bwd(provider, rows):
    torch.set_num_threads(torch.get_num_threads())
    module = _module(provider)
    x = torch.randn(M, IN_F, requires_grad=True)
    dy = torch.randn(M, OUT_F)
    # fwd: base GEMM 2·M·in·out; bwd: dX GEMM of the same size (no dW: the base is frozen)
    flops = 4 * M * IN_F * OUT_F + (0 if provider == FLOOR else 6 * M * R * (IN_F + OUT_F))
    t = time_fn(lambda: _step(module, x, dy), "cpu", warmup=3, rep=15)
    case = dict(
        op="lora_linear", provider=provider, mode="full", shape=f"{IN_F}->{OUT_F}", M=M, r=R, dtype="float32"
    )
    rows.append(timed_row(**case, device=device_name("cpu"), timing=t, flops=flops, peak_mem_bytes=None))

"""CPU LoRA linear: frozen base (the floor) vs PEFT's LoRA vs mbf's torch path, fwd+bwd, in float32
and over a bfloat16 base (fp32 adapters for both PEFT and mbf, as each keeps them by default), and
in float32 with LoRA dropout p = 0.1 (both in train mode, each drawing its own mask every call).

The shape is SmolLM2-135M's up_proj (576 -> 1536) at 2048 tokens, r = 16: the CPU path is a
product too. The three providers take turns call by call, so that a shared machine's changing load
falls on all of them alike. Run: ``python -m pytest bench/test_bench_lora_cpu.py -q -s``. Measures and
writes rows to ``bench/results/<device>-<date>.json``; it never asserts a speed.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from mbf.bench.providers import peft_lora
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import summarize

IN_F, OUT_F, M, R = 576, 1536, 2048, 16
PROVIDERS = (FLOOR, "peft", "mbf-torch")  # the floor first: the others' reference
REFERENCES = {"lora_linear": (FLOOR, "peft")}  # ratio_to_floor, and ratio_to_baseline: mbf vs PEFT
WARMUP, REP = 3, 25


def _module(provider: str, dtype: torch.dtype, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(IN_F, OUT_F).to(dtype)
    if provider == FLOOR:
        base.requires_grad_(False)
        return base
    if provider == "peft":
        return peft_lora(base, R, dropout=dropout).train()
    import mbf

    return mbf.LoRALinear.from_linear(base, r=R, alpha=2 * R, dropout=dropout, backend="torch").train()


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    module(x).backward(dy)


@pytest.mark.parametrize(
    "dtype,dropout",
    [("float32", 0.0), ("bfloat16", 0.0), ("float32", 0.1)],
    ids=["fp32", "bf16", "fp32-drop"],
)
def test_bench_lora_cpu_fwd_bwd(dtype, dropout, rows):
    dt = getattr(torch, dtype)
    modules = {p: _module(p, dt, dropout) for p in PROVIDERS}
    x = torch.randn(M, IN_F, dtype=dt, requires_grad=True)
    dy = torch.randn(M, OUT_F, dtype=dt)
    samples: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for i in range(WARMUP + REP):
        for p, module in modules.items():
            t0 = time.perf_counter()
            _step(module, x, dy)
            if i >= WARMUP:
                samples[p].append((time.perf_counter() - t0) * 1e3)
    for p in PROVIDERS:
        # fwd: base GEMM 2·M·in·out; bwd: dX GEMM of the same size (no dW: the base is frozen)
        flops = 4 * M * IN_F * OUT_F + (0 if p == FLOOR else 6 * M * R * (IN_F + OUT_F))
        case = dict(
            op="lora_linear", provider=p, mode="full", shape=f"{IN_F}->{OUT_F}", M=M, r=R, dtype=dtype,
            dropout=dropout,
        )  # fmt: skip
        timing = summarize(samples[p])
        rows.append(
            timed_row(**case, device=device_name("cpu"), timing=timing, flops=flops, peak_mem_bytes=None)
        )

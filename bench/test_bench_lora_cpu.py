"""CPU LoRA linear: frozen base (the floor) vs PEFT's LoRA vs mbf's torch path, fwd+bwd, fp32.

The shape is SmolLM2-135M's up_proj (576 -> 1536) at 2048 tokens, r = 16: the CPU path is a
product too. Run: ``python -m pytest bench/test_bench_lora_cpu.py -q -s``. Measures and writes
rows to ``bench/results/<device>-<date>.json``; it never asserts a speed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.common import append_rows, device_name, make_row, time_fn

IN_F, OUT_F, M, R = 576, 1536, 2048, 16
PROVIDERS = ("floor", "peft", "mbf-torch")


def _module(provider: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(IN_F, OUT_F)
    if provider == "floor":
        base.requires_grad_(False)
        return base
    if provider == "peft":
        from peft import LoraConfig, get_peft_model

        wrapper = nn.Sequential()
        wrapper.add_module("proj", base)
        return get_peft_model(wrapper, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
    import mbf

    return mbf.LoRALinear.from_linear(base, r=R, alpha=2 * R, backend="torch")


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    module(x).backward(dy)


@pytest.fixture(scope="module")
def rows():
    collected: list[dict] = []
    yield collected
    if collected:
        floor = next(r["ms"] for r in collected if r["provider"] == "floor")
        for r in collected:
            r["ratio_to_floor"] = r["ms"] / floor
        path = append_rows(collected)
        print(f"\nwrote {len(collected)} rows to {path}")
        for r in collected:
            print(f"{r['provider']:>10}: {r['ms']:8.2f} ms  {r['ratio_to_floor']:.3f}x floor")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_lora_cpu_fwd_bwd(provider, rows):
    torch.set_num_threads(torch.get_num_threads())
    module = _module(provider)
    x = torch.randn(M, IN_F, requires_grad=True)
    dy = torch.randn(M, OUT_F)
    # fwd: base GEMM 2·M·in·out; bwd: dX GEMM of the same size (no dW: the base is frozen)
    flops = 4 * M * IN_F * OUT_F + (0 if provider == "floor" else 6 * M * R * (IN_F + OUT_F))
    t = time_fn(lambda: _step(module, x, dy), "cpu", warmup=3, rep=15)
    rows.append(
        make_row(
            op="lora_linear",
            provider=provider,
            mode="full",
            shape=f"{IN_F}->{OUT_F}",
            M=M,
            r=R,
            dtype="float32",
            device=device_name("cpu"),
            tflops=flops / (t["ms"] * 1e-3) / 1e12,
            peak_mem_bytes=None,
            **t,
        )
    )

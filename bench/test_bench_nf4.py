"""QLoRA linear on CUDA: NF4 base vs bf16, fwd+bwd, Llama-3-8B shapes, r = 16, bf16 compute.

Providers: ``floor`` (bf16 frozen linear: base GEMM + dX GEMM, the floor), ``mbf-bf16`` (mbf's
LoRALinear on the bf16 weight), ``mbf-nf4`` (LoRALinear over the NF4 base, automatic path), the two
NF4 paths forced (``mbf-nf4-fused``: dequant in the GEMM's registers, ``mbf-nf4-dequant``: one dequant
pass + cuBLAS, whose crossover is where ``mbf.kernels.nf4.FUSED_MAX_M`` must come from), and
``peft-bnb4`` (PEFT LoRA over ``bnb.nn.Linear4bit``, nf4 + double quant). Every row records ms,
TFLOP/s, the peak extra CUDA memory of one step and the bytes of the base weight.

Run on a CUDA machine: ``python -m pytest bench/test_bench_nf4.py -q -s``. Skips without CUDA; it
never asserts a speed. Rows go to ``bench/results/<device>-<date>.json``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.common import append_rows, device_name, make_row, peak_memory, time_fn

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # Llama-3-8B (in, out)
TOKENS = (512, 2048, 8192)
R = 16
PROVIDERS = ("floor", "mbf-bf16", "mbf-nf4", "mbf-nf4-fused", "mbf-nf4-dequant", "peft-bnb4")
DTYPE = torch.bfloat16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the NF4 benchmark needs a CUDA GPU")


def _base(in_f: int, out_f: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        lin.weight.normal_(0, in_f**-0.5)
    return lin.requires_grad_(False)


def _peft_bnb4(base: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip(
        "bitsandbytes",
        reason="peft-bnb4 needs bitsandbytes (pip install mbf-lora[qlora])",
        exc_type=ImportError,
    )
    from peft import LoraConfig, get_peft_model

    q = bnb.nn.Linear4bit(
        base.in_features,
        base.out_features,
        bias=False,
        compute_dtype=DTYPE,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(base.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    wrapper = nn.Sequential()
    wrapper.add_module("proj", q.to("cuda"))
    wrapper.is_loaded_in_4bit = True  # PEFT then wraps it in its bitsandbytes Linear4bit LoRA layer
    return get_peft_model(wrapper, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))


def _step_fn(provider: str, base: nn.Linear, x: torch.Tensor, dy: torch.Tensor):
    """(one fwd+bwd closure, bytes of the base weight as the provider stores it)."""
    import mbf
    from mbf import functional, quant

    if provider == "floor":
        module, nbytes = base, base.weight.numel() * base.weight.element_size()
    elif provider == "mbf-bf16":
        module, nbytes = mbf.LoRALinear.from_linear(base, r=R, alpha=2 * R), base.weight.numel() * 2
    elif provider == "mbf-nf4":
        nf4 = quant.NF4Linear.from_linear(base)
        module, nbytes = mbf.LoRALinear.from_linear(nf4, r=R, alpha=2 * R), nf4.nf4.nbytes()
    elif provider.startswith("mbf-nf4-"):
        layer = mbf.LoRALinear.from_linear(quant.NF4Linear.from_linear(base), r=R, alpha=2 * R)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        w, path = layer.base.nf4, provider.rsplit("-", 1)[1]

        def module(inp):
            return functional.lora_linear_nf4(
                inp, w, None, layer.lora_A, layer.lora_B, layer.scaling, path=path
            )

        nbytes = w.nbytes()
    else:
        module = _peft_bnb4(base)
        # the same accounting as mbf's: a zero-copy view of bnb's Params4bit and quant_state
        nbytes = quant.NF4Linear.from_bnb(module.base_model.model.proj.base_layer).nf4.nbytes()

    def step() -> None:
        x.grad = None
        module(x).backward(dy)

    return step, nbytes


@pytest.fixture(scope="module")
def rows():
    collected: list[dict] = []
    yield collected
    if not collected:
        return
    floors = {(r["shape"], r["M"]): r["ms"] for r in collected if r["provider"] == "floor"}
    for r in collected:
        floor = floors.get((r["shape"], r["M"]))
        r["ratio_to_floor"] = None if floor is None else r["ms"] / floor
    path = append_rows(collected)
    print(f"\nwrote {len(collected)} rows to {path}")
    for r in collected:
        ratio = "" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.2f}x floor"
        print(f"{r['shape']:>12} M={r['M']:<5} {r['provider']:>16}: {r['ms']:7.3f} ms {ratio}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M", TOKENS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_bench_nf4_fwd_bwd(in_f, out_f, M, provider, rows):
    base = _base(in_f, out_f)
    x = torch.randn(M, in_f, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, out_f, device="cuda", dtype=DTYPE)
    step, nbytes = _step_fn(provider, base, x, dy)
    step()  # compile / warm up outside the measurement
    peak = peak_memory(step, "cuda")
    t = time_fn(step, "cuda")
    # fwd base GEMM 2·M·in·out + bwd dX GEMM of the same size; LoRA: S, the B term, dS, dB, dA, dX part
    flops = 4 * M * in_f * out_f + (0 if provider == "floor" else 12 * M * R * (in_f + out_f) // 2)
    rows.append(
        make_row(
            op="nf4_lora_linear",
            provider=provider,
            mode="full",
            shape=f"{in_f}->{out_f}",
            M=M,
            r=R,
            dtype="bfloat16",
            device=device_name("cuda"),
            tflops=flops / (t["ms"] * 1e-3) / 1e12,
            peak_mem_bytes=peak,
            base_bytes=nbytes,
            base_bytes_per_weight=nbytes / (in_f * out_f),
            **t,
        )
    )

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

from mbf.bench.providers import bnb_nf4_linear, peft_lora
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import peak_memory, time_fn

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # Llama-3-8B (in, out)
TOKENS = (512, 2048, 8192)
R = 16
# the floor first: the others' reference
PROVIDERS = (FLOOR, "mbf-bf16", "mbf-nf4", "mbf-nf4-fused", "mbf-nf4-dequant", "peft-bnb4")
REFERENCES = {"nf4_lora_linear": FLOOR}
DTYPE = torch.bfloat16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the NF4 benchmark needs a CUDA GPU")


def _base(in_f: int, out_f: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        lin.weight.normal_(0, in_f**-0.5)
    return lin.requires_grad_(False)


def _lora_over_nf4(base: nn.Module) -> nn.Module:
    """mbf's LoRALinear over ``base`` in NF4 (a dense linear quantised, a ``Linear4bit`` viewed zero-copy)."""
    import mbf

    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    mbf.inject(wrapper, mbf.LoRAConfig(r=R, alpha=2 * R, target_modules=("proj",), quantize="nf4"))
    return wrapper.proj


def _storage_bytes(layer: nn.Module) -> int:
    """Bytes of the base weight as stored (NF4: codes, absmax and their quantisation constants)."""
    tensors = [*layer.base.buffers(), *(p for p in layer.base.parameters() if not p.requires_grad)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _step_fn(provider: str, base: nn.Linear, x: torch.Tensor, dy: torch.Tensor):
    """(one fwd+bwd closure, bytes of the base weight as the provider stores it)."""
    import mbf
    from mbf import functional

    if provider == FLOOR:
        module, nbytes = base, base.weight.numel() * base.weight.element_size()
    elif provider == "mbf-bf16":
        module, nbytes = mbf.LoRALinear.from_linear(base, r=R, alpha=2 * R), base.weight.numel() * 2
    elif provider == "mbf-nf4":
        module = _lora_over_nf4(base)
        nbytes = _storage_bytes(module)
    elif provider.startswith("mbf-nf4-"):
        layer = _lora_over_nf4(base)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        w, path = layer.base.nf4, provider.rsplit("-", 1)[1]

        def module(inp):
            return functional.lora_linear_nf4(
                inp, w, None, layer.lora_A, layer.lora_B, layer.scaling, path=path
            )

        nbytes = _storage_bytes(layer)
    else:
        pytest.importorskip("bitsandbytes", reason="peft-bnb4 needs: pip install 'mbf-lora[qlora]'")
        q = bnb_nf4_linear(base, DTYPE)
        module = peft_lora(q, R, four_bit=True)
        # the same accounting as mbf's: mbf's zero-copy view of bnb's Params4bit and quant_state
        nbytes = _storage_bytes(_lora_over_nf4(q))

    def step() -> None:
        x.grad = None
        module(x).backward(dy)

    return step, nbytes


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
    flops = 4 * M * in_f * out_f + (0 if provider == FLOOR else 12 * M * R * (in_f + out_f) // 2)
    case = dict(op="nf4_lora_linear", provider=provider, mode="full", shape=f"{in_f}->{out_f}", M=M, r=R)
    extra = dict(peak_mem_bytes=peak, base_bytes=nbytes, base_bytes_per_weight=nbytes / (in_f * out_f))
    device = device_name("cuda")
    rows.append(timed_row(**case, dtype="bfloat16", device=device, timing=t, flops=flops, **extra))

"""QLoRA linear on CUDA: NF4 base vs bf16, fwd+bwd, Llama-3-8B shapes, r = 16, bf16 compute.

Providers: ``floor`` (bf16 frozen linear: base GEMM + dX GEMM, the floor), ``mbf-bf16`` (mbf's
LoRALinear on the bf16 weight), ``mbf-nf4`` (LoRALinear over the NF4 base, automatic path), the two
NF4 paths forced (``mbf-nf4-fused``: dequant in the GEMM's registers, ``mbf-nf4-dequant``: one dequant
pass + cuBLAS, whose crossover is where ``mbf.kernels.route.FUSED_MAX_M`` must come from), and
``peft-bnb4`` (PEFT LoRA over ``bnb.nn.Linear4bit``, nf4 + double quant). Every row records ms,
TFLOP/s, the peak extra CUDA memory of one step and the bytes of the base weight.

Run on a CUDA machine: ``python -m pytest bench/test_bench_nf4.py -q -s``. Skips without CUDA; it
never asserts a speed. Rows go to ``bench/results/<device>-<date>.json``.
"""

from __future__ import annotations

import pytest
import torch

from mbf.bench.layers import NF4_PROVIDERS, nf4_case
from mbf.bench.rows import FLOOR, device_name, timed_row
from mbf.bench.timing import peak_memory, time_fn

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # Llama-3-8B (in, out)
TOKENS = (512, 2048, 8192)
R = 16
REFERENCES = {"nf4_lora_linear": FLOOR}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the NF4 benchmark needs a CUDA GPU")


@pytest.mark.parametrize("provider", NF4_PROVIDERS)
@pytest.mark.parametrize("M", TOKENS)
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_bench_nf4_fwd_bwd(in_f, out_f, M, provider, rows):
    if provider == "peft-bnb4":
        pytest.importorskip("bitsandbytes", reason="peft-bnb4 needs: pip install 'mbf-lora[qlora]'")
    step, flops, nbytes = nf4_case(provider, in_f, out_f, M, R, torch.bfloat16, "cuda")
    step()  # compile / warm up outside the measurement
    peak = peak_memory(step, "cuda")
    t = time_fn(step, "cuda")
    case = dict(op="nf4_lora_linear", provider=provider, mode="full", shape=f"{in_f}->{out_f}", M=M, r=R)
    extra = dict(peak_mem_bytes=peak, base_bytes=nbytes, base_bytes_per_weight=nbytes / (in_f * out_f))
    device = device_name("cuda")
    rows.append(timed_row(**case, dtype="bfloat16", device=device, timing=t, flops=flops, **extra))

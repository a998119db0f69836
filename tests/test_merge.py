"""Batched time-aware merge (SLAO step 3): torch path (foreach) and Triton kernel (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch import nn

from mbf import functional, reference

BACKENDS = ("torch", "triton")
# The Triton backend runs compiled on a GPU when there is one, else in the interpreter on CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


# odd sizes, one element, and tensors spanning several 2048-element chunks of the kernel
SHAPES = [(5, 3), (4097, 2), (1, 1), (576, 8), (3000, 7), (64, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.37, 1 / 3**0.5, 0.9])
def test_merge_formula_for_many_layers_at_once(backend, dtype, lam):
    ms = [torch.randn(s).to(dtype).to(_dev(backend)) for s in SHAPES]
    fs = [nn.Parameter(torch.randn(s).to(dtype).to(_dev(backend))) for s in SHAPES]  # trainable, like lora_B
    want = [reference.time_aware_merge(m.double(), f.detach().double(), lam).cpu() for m, f in zip(ms, fs)]
    before_f = [f.detach().clone() for f in fs]
    ptrs = [m.data_ptr() for m in ms]
    functional.time_aware_merge_(ms, fs, lam, backend=backend)
    for m, w, f, f0, p in zip(ms, want, fs, before_f, ptrs):
        assert m.dtype == dtype and m.data_ptr() == p  # in place
        assert_close(m.cpu(), w, dtype=dtype)
        assert torch.equal(f.detach(), f0)  # the fine-tuned B is only read


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_one_makes_merged_equal_fine_tuned_exactly(backend):
    ms = [torch.randn(s, device=_dev(backend)) for s in SHAPES]
    fs = [torch.randn(s, device=_dev(backend)) * 1e3 for s in SHAPES]  # different scales: m + (f − m) rounds
    functional.time_aware_merge_(ms, fs, 1.0, backend=backend)
    assert all(torch.equal(m, f) for m, f in zip(ms, fs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_call(backend):
    dev = _dev(backend)
    ms = [
        torch.randn(7, 3, device=dev),
        torch.randn(9, 2, device=dev).bfloat16(),
        torch.randn(4, 4, device=dev),
    ]
    fs = [
        torch.randn(7, 3, device=dev),
        torch.randn(9, 2, device=dev).bfloat16(),
        torch.randn(4, 4, device=dev),
    ]
    want = [reference.time_aware_merge(m.double(), f.double(), 0.25).cpu() for m, f in zip(ms, fs)]
    functional.time_aware_merge_(ms, fs, 0.25, backend=backend)
    for m, w in zip(ms, want):
        assert_close(m.cpu(), w, dtype=m.dtype)


def test_merge_checks_inputs():
    with pytest.raises(ValueError, match="2 merged Bs but 1 fine-tuned Bs"):
        functional.time_aware_merge_([torch.randn(3, 2), torch.randn(3, 2)], [torch.randn(3, 2)], 0.5)
    with pytest.raises(ValueError, match=r"merged B \(3, 2\) and fine-tuned B \(2, 3\) differ"):
        functional.time_aware_merge_([torch.randn(3, 2)], [torch.randn(2, 3)], 0.5)
    functional.time_aware_merge_([], [], 0.5, backend="triton")  # nothing to do, nothing launched


def test_kernel_rejects_strided_tensors():
    from mbf.kernels import merge

    m = torch.randn(4, 6, device=KERNEL_DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="tensor 0: the batched merge needs contiguous tensors"):
        merge.time_aware_merge_([m], [torch.randn(4, 3, device=KERNEL_DEVICE)], 0.5)
    with pytest.raises(ValueError, match="dtypes torch.float64"):
        merge.time_aware_merge_([torch.randn(2, 2, dtype=torch.float64)], [torch.randn(2, 2)], 0.5)

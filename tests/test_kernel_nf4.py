"""NF4 Triton kernels (through the interpreter on CPU) against the float64 reference."""

import pytest
import torch
from conftest import assert_close

from mbf import functional, nf4, reference

knf4 = pytest.importorskip("mbf.kernels.nf4", reason="triton is not installed", exc_type=ImportError)

# the interpreter on CPU (conftest sets TRITON_INTERPRET=1 there), the real kernels on a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (M, N, K, r): M = 1, N odd and not a multiple of the tile, K a multiple of 64 as the blocks require
SHAPES = [(1, 67, 128, 1), (37, 33, 192, 5), (20, 96, 64, 16)]
DTYPES = [torch.float32, torch.bfloat16]


def _nf4(N: int, K: int, dtype: torch.dtype) -> nf4.NF4Weight:
    return nf4.quantize_nf4((torch.randn(N, K) * 0.05).to(DEVICE, dtype))


def _args(w: nf4.NF4Weight):
    return w.packed, w.block_scales(), w.code, w.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_kernel_bit_exact(dtype):
    w = _nf4(45, 320, dtype)  # 7200 bytes: several programs and a partial last one
    out = knf4.nf4_dequantize(*_args(w), dtype)
    assert out.dtype == dtype and torch.equal(out, nf4.dequantize_nf4(w))


@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_forward_kernel(M, N, K, r, dtype):
    w = _nf4(N, K, dtype)
    x, A = torch.randn(M, K).to(DEVICE, dtype), (torch.randn(r, K) * 0.1).to(DEVICE, dtype)
    B, Bm, b = (
        (torch.randn(N, r) * 0.1).to(DEVICE, dtype),
        (torch.randn(N, r) * 0.1).to(DEVICE, dtype),
        torch.randn(N).to(DEVICE, dtype),
    )
    S = x @ A.T
    for bias, merged, lam in ((b, Bm, 0.7), (None, None, 1.0)):
        B_eff = B if merged is None else torch.lerp(merged.float(), B.float(), lam).to(dtype)
        y = knf4.nf4_lora_forward(x, *_args(w), bias=bias, S=S, B_eff=B_eff, scaling=2.0)
        W64 = nf4.dequantize_nf4(w).double()
        ref = reference.lora_linear(
            x.double(),
            W64,
            None if bias is None else bias.double(),
            A.double(),
            B.double(),
            2.0,
            None if merged is None else merged.double(),
            lam,
        )
        assert y.dtype == dtype and y.shape == (M, N)
        assert_close(y, ref, dtype)


@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dx_kernel(M, N, K, r, dtype):
    w = _nf4(N, K, dtype)
    dy, A = torch.randn(M, N).to(DEVICE, dtype), (torch.randn(r, K) * 0.1).to(DEVICE, dtype)
    dS = (torch.randn(M, r) * 0.3).to(DEVICE, dtype)
    W64 = nf4.dequantize_nf4(w).double()
    dx = knf4.nf4_lora_dx(dy, *_args(w), dS=dS, A=A, scaling=1.5)
    assert_close(dx, dy.double() @ W64 + 1.5 * dS.double() @ A.double(), dtype)
    base_only = knf4.nf4_lora_dx(dy, *_args(w), dS=None, A=A, scaling=1.5)  # the dropout case: base GEMM only
    assert_close(base_only, dy.double() @ W64, dtype)


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_autograd_paths_against_reference(path, dtype, dropout):
    """Forward and the gradients of x, A, B through each Triton path, merged B and λ in play."""
    M, N, K, r = 13, 45, 128, 4
    w = _nf4(N, K, dtype)
    x = torch.randn(2, M, K).to(DEVICE, dtype).requires_grad_()  # a batch dim: (..., in)
    A = (torch.randn(r, K) * 0.1).to(DEVICE, dtype).requires_grad_()
    B = (torch.randn(N, r) * 0.1).to(DEVICE, dtype).requires_grad_()
    Bm, b = (torch.randn(N, r) * 0.1).to(DEVICE, dtype), torch.randn(N).to(DEVICE, dtype)
    y = functional.lora_linear_nf4(
        x, w, b, A, B, 2.0, Bm, 0.6, dropout=dropout, seed=7, backend="triton", path=path
    )
    dy = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)

    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    W64 = nf4.dequantize_nf4(w).double()
    ref = reference.lora_linear(  # the NF4 paths run LoRALinearFunction: the torch mask family
        leaves[0], W64, b.double(), leaves[1], leaves[2], 2.0, Bm.double(), 0.6, dropout, 7, rng="torch"
    )
    rx, rA, rB = torch.autograd.grad(ref, leaves, dy.double())
    for got, want in ((y, ref), (gx, rx), (gA, rA), (gB, rB)):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


def test_choose_path_by_token_count():
    assert knf4.choose_path(1) == "fused"
    assert knf4.choose_path(knf4.FUSED_MAX_M) == "fused"
    assert knf4.choose_path(knf4.FUSED_MAX_M + 1) == "dequant"


def test_kernel_shape_errors():
    w = _nf4(8, 64, torch.float32)
    with pytest.raises(ValueError, match="in_features 96 must be a multiple of 64"):
        knf4.nf4_dequantize(w.packed, w.block_scales(), w.code, (8, 96), torch.float32)
    with pytest.raises(ValueError, match="do not fit W"):
        knf4.nf4_lora_forward(
            torch.randn(3, 128, device=DEVICE),
            *_args(w),
            bias=None,
            S=torch.randn(3, 2, device=DEVICE),
            B_eff=torch.randn(8, 2, device=DEVICE),
            scaling=1.0,
        )

"""NF4 Triton kernels (through the interpreter on CPU) against the float64 reference."""

import pytest
import torch
from conftest import assert_close

from mbf import functional, nf4, reference
from mbf.kernels import route

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


def test_dequant_kernel_bit_exact_to_bitsandbytes_over_several_nested_groups():
    """bitsandbytes quantises, the kernel dequantises: 640 blocks, so 3 groups of 256 nested scales
    (the shapes above have at most one), each group's scales far from its neighbours'."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    W = torch.randn(80, 512) * 0.02
    W[:32] *= 50.0  # blocks 0-255 (group 0) large, the rest small
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = nf4.weight_from_state(q, state, "test", torch.float32)
    assert w.absmax_scale.numel() == 3
    args = (w.packed.to(DEVICE), w.block_scales().to(DEVICE), w.code.to(DEVICE), w.shape)
    out = knf4.nf4_dequantize(*args, torch.float32)
    assert torch.equal(out.cpu(), F.dequantize_4bit(q, state))


@pytest.mark.parametrize("M,N,K,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [True, False], ids=["forward", "dx"])
def test_fused_addmm_kernel(M, N, K, r, dtype, transposed):
    """``C + a Wᵀ`` (forward) and ``C + a W`` (dX), W dequantised in the tiles, C any addend."""
    w = _nf4(N, K, dtype)
    L, OUT = (K, N) if transposed else (N, K)
    a, C = torch.randn(M, L).to(DEVICE, dtype), torch.randn(M, OUT).to(DEVICE, dtype)
    W64 = nf4.dequantize_nf4(w).double()
    got = knf4.nf4_addmm(C, a, *_args(w), transposed)
    want = C.double() + a.double() @ (W64.T if transposed else W64)
    assert got.dtype == dtype and got.shape == (M, OUT)
    assert_close(got, want, dtype)


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
    ref = reference.lora_linear(  # the Philox mask of seed 7 on every path
        leaves[0], W64, b.double(), leaves[1], leaves[2], 2.0, Bm.double(), 0.6, dropout=dropout, seed=7
    )
    rx, rA, rB = torch.autograd.grad(ref, leaves, dy.double())
    for got, want in ((y, ref), (gx, rx), (gA, rA), (gB, rB)):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


def test_the_nf4_path_by_token_count():
    assert route.nf4_path_of(1) == "fused"
    assert route.nf4_path_of(route.FUSED_MAX_M) == "fused"
    assert route.nf4_path_of(route.FUSED_MAX_M + 1) == "dequant"


def test_kernel_shape_errors():
    w = _nf4(8, 64, torch.float32)
    with pytest.raises(ValueError, match="in_features 96 must be a multiple of 64"):
        knf4.nf4_dequantize(w.packed, w.block_scales(), w.code, (8, 96), torch.float32)
    with pytest.raises(ValueError, match="do not fit W"):
        knf4.nf4_addmm(torch.randn(3, 8, device=DEVICE), torch.randn(3, 128, device=DEVICE), *_args(w), True)

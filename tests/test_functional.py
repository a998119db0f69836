"""The PyTorch fast path of lora_linear (hand-written backward) against the float64 reference."""

import pytest
import torch
from conftest import assert_close

from mbf import functional, reference
from mbf.functional.dropout import _philox4x, philox_keep_mask


def _inputs(M_shape, K, N, r, dtype, bias=True, merged=False):
    # drawn in float64, then rounded to ``dtype``: the reference sees exactly the fast path's inputs
    g = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype).double()  # noqa: E731
    x, W, A, B = g(*M_shape, K), g(N, K), g(r, K), g(N, r)
    b = g(N) if bias else None
    Bm = g(N, r) if merged else None
    return x, W, b, A, B, Bm


def _grads(fn, x, W, b, A, B, Bm, dY):
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    y = fn(x, W, b, A, B, Bm)
    y.backward(dY)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "M_shape,K,N,r,bias,merged",
    [((1,), 7, 5, 1, True, False), ((2, 9), 24, 17, 4, False, True), ((33,), 40, 48, 16, True, True)],
)
def test_torch_path_matches_reference(dtype, M_shape, K, N, r, bias, merged):
    x, W, b, A, B, Bm = _inputs(M_shape, K, N, r, dtype, bias, merged)
    dY = torch.randn(*M_shape, N, dtype=torch.float64).to(dtype).double()
    lam, s = 0.41, 1.7

    def ref(x, W, b, A, B, Bm):
        return reference.lora_linear(x, W, b, A, B, s, merged_B=Bm, lam=lam)

    def fast(x, W, b, A, B, Bm):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return functional.lora_linear(
            x.to(dtype),
            cast(W),
            cast(b),
            A.to(dtype),
            B.to(dtype),
            s,
            merged_B=cast(Bm),
            lam=lam,
            backend="torch",
        )

    expected = _grads(ref, x, W, b, A, B, Bm, dY)
    x2, A2, B2 = (t.to(dtype).requires_grad_(True) for t in (x, A, B))
    y = fast(x2, W, b, A2, B2, Bm)
    assert y.dtype == dtype and y.shape == (*M_shape, N)
    y.backward(dY.to(dtype))
    for got, want in zip((y, x2.grad, A2.grad, B2.grad), expected):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_path_dropout_matches_reference_mask(dtype):
    """The torch paths draw the Philox mask of ``reference.dropout_keep_mask(seed)``: forward and every
    gradient equal the reference's, the mask of the backward being the forward's."""
    x, W, b, A, B, Bm = _inputs((2, 13), 24, 10, 3, dtype, merged=True)
    dY = torch.randn(2, 13, 10, dtype=torch.float64).to(dtype).double()

    def run(seed, fast=True):
        def fn(x, W, b, A, B, Bm):
            if not fast:
                return reference.lora_linear(x, W, b, A, B, 2.0, Bm, 0.6, dropout=0.3, seed=seed)
            cast = lambda t: t.to(dtype)  # noqa: E731
            args = (cast(x), cast(W), cast(b), cast(A), cast(B), 2.0, cast(Bm), 0.6)
            return functional.lora_linear(*args, dropout=0.3, seed=seed, backend="torch")

        return _grads(fn, x, W, b, A, B, Bm, dY)

    want = run(11, fast=False)
    got = run(11)
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, dtype)
    assert not torch.allclose(run(12)[0], got[0])  # another seed, another mask


def test_torch_path_dropout_without_seed_reads_torch_generator():
    """No seed: the Philox key is ``torch.randint(0, 2**62, ())`` from torch's global generator, drawn
    in the graph (no ``.item()``), so ``torch.manual_seed(s)`` fixes the mask."""
    x, W, b, A, B, _ = _inputs((9,), 16, 7, 2, torch.float64)
    dY = torch.randn(9, 7, dtype=torch.float64)
    torch.manual_seed(5)
    key = int(torch.randint(0, 2**62, ()))
    spec = lambda *a: reference.lora_linear(*a[:5], 1.5, dropout=0.4, seed=key)  # noqa: E731
    want = _grads(spec, x, W, b, A, B, None, dY)

    def fast(*a):
        torch.manual_seed(5)
        return functional.lora_linear(*a[:5], 1.5, dropout=0.4, backend="torch")

    for g_, w_ in zip(_grads(fast, x, W, b, A, B, None, dY), want):
        assert_close(g_, w_, torch.float64)


@pytest.mark.parametrize("M,K", [(1, 1), (5, 37), (33, 64), (3, 130)])
@pytest.mark.parametrize("seed", [0, 123456789, 2**40 + 7, 2**63 - 1])
def test_vectorised_philox_is_the_reference_mask_bit_for_bit(M, K, seed):
    """The torch paths' Philox (one int64 multiply a product, wrapping) against the spec's limbs."""
    for p in (0.1, 0.5, 0.9):
        want = reference.dropout_keep_mask((M, K), p, seed)
        got = philox_keep_mask(M, K, reference.dropout_threshold(p), torch.tensor(seed))
        assert got.dtype == torch.bool and torch.equal(got, want)
    counters = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**40 + 3, 2**62, 2**63 - 1])  # both words
    words = _philox4x(torch.tensor(seed), counters)
    for got, want in zip(words, reference.philox_randint4x(seed, counters)):
        assert torch.equal(got, want)


def test_frozen_tensors_get_no_gradient():
    x, W, b, A, B, Bm = (t.float() for t in _inputs((5,), 8, 6, 2, torch.float32, merged=True))
    A.requires_grad_(True)
    B.requires_grad_(True)
    functional.lora_linear(x, W, b, A, B, 1.0, merged_B=Bm, backend="torch").sum().backward()
    assert A.grad is not None and B.grad is not None
    assert W.grad is None and b.grad is None


def test_validation_errors():
    x, W, b, A, B, _ = _inputs((3,), 8, 6, 2, torch.float64)
    with pytest.raises(ValueError, match="x has 7 features, weight expects 8"):
        functional.lora_linear(x[:, :7], W, b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"B has shape \(6, 3\), expected \(6, 2\)"):
        functional.lora_linear(x, W, b, A, torch.randn(6, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="dropout 1.0 must be in"):
        functional.lora_linear(x, W, b, A, B, 1.0, dropout=1.0)
    with pytest.raises(ValueError, match="backend 'cuda' must be one of"):
        functional.lora_linear(x, W, b, A, B, 1.0, backend="cuda")


def test_auto_backend_uses_torch_on_cpu():
    assert functional.resolve_backend("auto", torch.zeros(1)) == "torch"
    assert functional.resolve_backend("triton", torch.zeros(1)) == "triton"


def test_orthonormal_rows_groups_shapes_and_names_bad_layers():
    As = [torch.randn(4, 16), torch.randn(2, 9), torch.randn(4, 16)]
    Qs = functional.orthonormal_rows(As, backend="torch")
    for A, Q in zip(As, Qs):
        assert Q.shape == A.shape
        torch.testing.assert_close(Q, reference.orthonormal_rows(A))
    bad = torch.randn(4, 16)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="layers.3.self_attn.q_proj: lora_A has non-finite values"):
        functional.orthonormal_rows([As[0], bad], names=["a", "layers.3.self_attn.q_proj"], backend="torch")
    with pytest.raises(ValueError, match=r"v_proj: A of shape \(5, 3\) must be \(r, d\) with r <= d"):
        functional.orthonormal_rows([torch.randn(5, 3)], names=["v_proj"], backend="torch")


def test_time_aware_merge_in_place_for_many_layers():
    ms = [torch.randn(6, 2), torch.randn(3, 4), torch.randn(6, 2)]
    fs = [torch.randn_like(m) for m in ms]
    want = [reference.time_aware_merge(m.double(), f.double(), 0.3) for m, f in zip(ms, fs)]
    functional.time_aware_merge_(ms, fs, 0.3, backend="torch")
    for m, w in zip(ms, want):
        assert_close(m, w, torch.float32)

"""The PyTorch fast path of lora_linear (hand-written backward) against the float64 reference."""

import pytest
import torch
from conftest import assert_close

from mbf import functional, reference


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
    """The torch paths draw ``reference.torch_keep_mask(seed)``: forward and every gradient equal the
    reference with ``rng="torch"``, the mask of the backward being the forward's."""
    x, W, b, A, B, Bm = _inputs((2, 13), 24, 10, 3, dtype, merged=True)
    dY = torch.randn(2, 13, 10, dtype=torch.float64).to(dtype).double()

    def run(seed, fast=True, rng="torch"):
        def fn(x, W, b, A, B, Bm):
            if not fast:
                return reference.lora_linear(x, W, b, A, B, 2.0, Bm, 0.6, dropout=0.3, seed=seed, rng=rng)
            cast = lambda t: t.to(dtype)  # noqa: E731
            args = (cast(x), cast(W), cast(b), cast(A), cast(B), 2.0, cast(Bm), 0.6)
            return functional.lora_linear(*args, dropout=0.3, seed=seed, backend="torch")

        return _grads(fn, x, W, b, A, B, Bm, dY)

    want = run(11, fast=False)
    got = run(11)
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, dtype)
    assert not torch.allclose(run(12)[0], got[0])  # another seed, another mask
    philox = run(11, fast=False, rng="philox")  # the Triton kernels' family: a different mask
    assert not torch.allclose(philox[0], want[0])


def test_torch_path_dropout_without_seed_reads_torch_generator():
    """No seed: the mask is ``torch.rand`` from torch's global generator (no ``.item()``), so
    ``torch.manual_seed(s)`` gives the mask of ``seed=s`` (both CPU Mersenne twisters seeded with s)."""
    x, W, b, A, B, _ = _inputs((9,), 16, 7, 2, torch.float64)
    dY = torch.randn(9, 7, dtype=torch.float64)
    spec = lambda *a: reference.lora_linear(*a[:5], 1.5, dropout=0.4, seed=5, rng="torch")  # noqa: E731
    want = _grads(spec, x, W, b, A, B, None, dY)

    def fast(*a):
        torch.manual_seed(5)
        return functional.lora_linear(*a[:5], 1.5, dropout=0.4, backend="torch")

    for g_, w_ in zip(_grads(fast, x, W, b, A, B, None, dY), want):
        assert_close(g_, w_, torch.float64)


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

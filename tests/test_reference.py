"""The spec itself, against float64 computed by hand (loops / closed forms)."""

import pytest
import torch

from mbf import reference


def test_lora_linear_matches_hand_computation():
    x = torch.randn(3, 5, dtype=torch.float64)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    A, B = torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    y = reference.lora_linear(x, W, b, A, B, scaling=1.5)
    for m in range(3):
        for o in range(4):
            base = sum(x[m, k] * W[o, k] for k in range(5)) + b[o]
            lora = sum(B[o, j] * sum(x[m, k] * A[j, k] for k in range(5)) for j in range(2))
            assert y[m, o].item() == pytest.approx((base + 1.5 * lora).item(), rel=1e-12)


def test_lora_linear_time_aware_B_eff():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    W = torch.randn(6, 7, dtype=torch.float64)
    A, B, Bm = (torch.randn(s, dtype=torch.float64) for s in [(3, 7), (6, 3), (6, 3)])
    lam = 0.37
    y = reference.lora_linear(x, W, None, A, B, 2.0, merged_B=Bm, lam=lam)
    B_eff = Bm + lam * (B - Bm)
    torch.testing.assert_close(y, x @ W.T + 2.0 * (x @ A.T) @ B_eff.T, rtol=1e-12, atol=1e-12)
    # λ = 1 is the fine-tuned adapter, λ = 0 the merged one
    y1 = reference.lora_linear(x, W, None, A, B, 2.0, merged_B=Bm, lam=1.0)
    torch.testing.assert_close(y1, reference.lora_linear(x, W, None, A, B, 2.0), rtol=1e-12, atol=1e-12)
    y0 = reference.lora_linear(x, W, None, A, B, 2.0, merged_B=Bm, lam=0.0)
    torch.testing.assert_close(y0, reference.lora_linear(x, W, None, A, Bm, 2.0), rtol=1e-12, atol=1e-12)


def test_dropout_mask_is_seeded_and_has_the_right_rate():
    mask = reference.dropout_keep_mask
    keep1 = mask((64, 96), 0.3, seed=7)
    keep2 = mask((64, 96), 0.3, seed=7)
    keep3 = mask((64, 96), 0.3, seed=8)
    assert keep1.dtype == torch.bool and torch.equal(keep1, keep2)
    assert not torch.equal(keep1, keep3)
    assert abs(keep1.float().mean().item() - 0.7) < 0.02
    assert mask((8, 8), 0.0, seed=1).all()
    torch.rand(3)  # the global generator does not enter a seeded mask
    assert torch.equal(mask((64, 96), 0.3, seed=7), keep1)


def test_dropout_applies_to_adapter_branch_only():
    x = torch.randn(16, 8, dtype=torch.float64)
    W, A, B = (
        torch.randn(5, 8, dtype=torch.float64),
        torch.randn(2, 8, dtype=torch.float64),
        torch.randn(5, 2, dtype=torch.float64),
    )
    y = reference.lora_linear(x, W, None, A, B, 1.0, dropout=0.5, seed=3)
    keep = reference.dropout_keep_mask((16, 8), 0.5, seed=3).double()
    torch.testing.assert_close(y, x @ W.T + ((x * keep * 2.0) @ A.T) @ B.T, rtol=1e-12, atol=1e-12)


def test_policy_rounding_points():
    """With the policy's dtypes the forward rounds S to ct, the addend's operands and the addend to od
    (by hand below), while gradients carry the ct (fp32) roundings only, never od's (bf16)."""
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    A = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64)
    ct, od = torch.float32, torch.bfloat16
    y = reference.lora_linear(x, W, b, A, B, 0.7, compute_dtype=ct, out_dtype=od)
    r = lambda t, dt: t.to(dt).double()  # noqa: E731
    S = r(x @ A.T, ct)
    C = r(b + r(S, od) @ r(0.7 * B, od).T, od)
    torch.testing.assert_close(y, x @ W.T + C, rtol=1e-15, atol=1e-15)
    assert not torch.allclose(y, reference.lora_linear(x, W, b, A, B, 0.7), rtol=1e-6, atol=0)
    gx, gA = torch.autograd.grad(y.sum(), (x, A))
    exact = reference.lora_linear(x, W, b, A, B, 0.7)
    ex, eA = torch.autograd.grad(exact.sum(), (x, A))
    torch.testing.assert_close(gx, ex, rtol=2e-6, atol=2e-6)  # bf16's would be ~4e-3
    torch.testing.assert_close(gA, eA, rtol=2e-6, atol=2e-6)


def test_philox_known_values():
    # values of Triton's tl.randint(seed, offset) (Philox 4x32-10), checked against the interpreter
    assert reference.philox_randint(0, torch.arange(3)).tolist() == [1713891541, 4175744164, 83534633]
    assert reference.philox_randint(12345, torch.arange(3)).tolist() == [3522838145, 11954473, 1814877333]


@pytest.mark.parametrize("r,d", [(1, 5), (3, 3), (4, 17), (16, 64)])
def test_orthonormal_rows_sign_convention_and_row_space(r, d):
    A = torch.randn(r, d, dtype=torch.float64)
    Q = reference.orthonormal_rows(A)
    torch.testing.assert_close(Q @ Q.T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    # same row space: A = R_t Q with R_t = A Qᵀ lower-triangular, positive diagonal (= Rᵀ)
    Rt = A @ Q.T
    torch.testing.assert_close(Rt @ Q, A, atol=1e-10, rtol=0)
    assert torch.allclose(Rt, torch.tril(Rt), atol=1e-10)
    assert (torch.diagonal(Rt) >= 0).all()


def test_orthonormal_rows_zero_sign_counts_positive():
    # a zero column in Aᵀ gives R[j, j] = 0: the column of Q must keep LAPACK's sign (times +1)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    Q0, R0 = torch.linalg.qr(A.T)
    Q = reference.orthonormal_rows(A)
    assert R0[1, 1].item() == 0.0
    torch.testing.assert_close(Q[1], Q0[:, 1] * (1.0 if R0[1, 1] >= 0 else -1.0))


def test_orthonormal_rows_runs_in_fp32_for_half_inputs():
    A = torch.randn(4, 32).to(torch.bfloat16)
    Q = reference.orthonormal_rows(A)
    assert Q.dtype == torch.bfloat16
    ref = reference.orthonormal_rows(A.double())
    torch.testing.assert_close(Q.double(), ref, atol=1e-2, rtol=0)


def test_time_aware_merge_by_hand():
    m, f = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(reference.time_aware_merge(m, f, 0.25), 0.75 * m + 0.25 * f)


def test_project_out_removes_the_basis():
    Q = reference.orthonormal_rows(torch.randn(4, 20, dtype=torch.float64))
    U = torch.randn(6, 20, dtype=torch.float64)
    P = reference.project_out(U, Q)
    torch.testing.assert_close(P @ Q.T, torch.zeros(6, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(reference.project_out(P, Q), P, atol=1e-12, rtol=0)
    torch.testing.assert_close(U - P, (U @ Q.T) @ Q, atol=1e-12, rtol=0)  # what was removed: U's part in Q


def test_project_out_by_hand():
    """Q = the first two axes of R^3: each row keeps its third coordinate only."""
    Q = torch.eye(3, dtype=torch.float64)[:2]
    U = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 6.0]], dtype=torch.float64)
    want = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(reference.project_out(U, Q), want, atol=0, rtol=0)

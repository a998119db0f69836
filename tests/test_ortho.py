"""Batched orthonormalisation (SLAO step 2) and projection: torch path and Triton kernel (interpreter on CPU).

Everything is checked against float64 ``torch.linalg.qr`` with the sign fix (``reference``) and
against the defining properties of the factorisation ``A = L Q`` (L lower triangular, diag ≥ 0):
orthonormal rows, A's row space kept, L triangular. Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close

from mbf import functional, reference

BACKENDS = ("torch", "triton")
EPS32 = torch.finfo(torch.float32).eps
# The Triton backend runs compiled on a GPU when there is one, else in the interpreter on CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def _with_spectrum(G: int, r: int, d: int, cond: float) -> torch.Tensor:
    """``(G, r, d)`` fp64 ``U diag(s) Vᵀ`` with random orthogonal U, V and s from 1 down to 1/cond."""
    U = torch.linalg.qr(torch.randn(G, r, r, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(G, d, r, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
    return (U * s) @ V.transpose(-1, -2)


def _orth_error(Q: torch.Tensor) -> torch.Tensor:
    Q64 = Q.double()
    eye = torch.eye(Q.shape[-2], dtype=torch.float64)
    return torch.linalg.matrix_norm(Q64 @ Q64.transpose(-1, -2) - eye)  # Frobenius, per matrix


def _factor_checks(A: torch.Tensor, Q: torch.Tensor, tol: float) -> None:
    """Q orthonormal, A = L Q with L = A Qᵀ lower triangular, diag(L) > 0, A's row space kept."""
    A64, Q64 = A.double(), Q.double()
    scale = torch.linalg.matrix_norm(A64)
    assert _orth_error(Q).max() <= 1e-5
    L = A64 @ Q64.transpose(-1, -2)  # (G, r, r)
    assert (torch.linalg.matrix_norm(torch.triu(L, 1)) <= tol * scale).all()
    assert (torch.diagonal(L, dim1=-2, dim2=-1) > 0).all()
    assert (torch.linalg.matrix_norm(A64 - L @ Q64) <= tol * scale).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_qr_on_mixed_shapes(backend, dtype):
    # ranks 1, 7, 8, 16; widths mixed within a rank (the kernel takes them in one launch); r = d
    shapes = [(1, 5), (7, 33), (7, 20), (16, 100), (8, 8), (16, 40), (7, 33)]
    As = [torch.randn(s).to(dtype) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # random Gaussian A is full rank: no warning
        Qs = [
            Q.cpu() for Q in functional.orthonormal_rows([A.to(_dev(backend)) for A in As], backend=backend)
        ]
    for A, Q in zip(As, Qs):
        assert Q.shape == A.shape and Q.dtype == dtype
        assert_close(Q, reference.orthonormal_rows(A.double()))
        if dtype == torch.float32:
            assert _orth_error(Q) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r, d", [(16, 128), (6, 50)])
def test_condition_number_1e6(backend, r, d):
    A = _with_spectrum(3, r, d, 1e6).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cond 1e6 is ill-conditioned, not rank-deficient
        Q = torch.stack(functional.orthonormal_rows(list(A.to(_dev(backend))), backend=backend)).cpu()
    _factor_checks(A, Q, tol=1e-6)
    Q64 = reference.orthonormal_rows(A.double())
    # q_1 = a_1 / ‖a_1‖ is perfectly conditioned; later rows move by up to κ · eps under rounding.
    assert_close(Q[:, 0], Q64[:, 0], atol=1e-6, rtol=0)
    assert (Q.double() - Q64).abs().max() <= 1e6 * EPS32


def _rank_deficient_batch() -> torch.Tensor:
    G, r, d = 4, 6, 40
    A = torch.randn(G, r, d)
    A[0, 3] = 0.0  # the explicit rank-deficient cases: a zero row,
    A[1, 4] = A[1, 1]  # a repeated row,
    A[2, 5] = 2.0 * A[2, 0]  # an exact multiple,
    A[3] = (torch.randn(r, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64)).float()  # rank 3
    return A


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_is_completed_with_a_warning(backend):
    A = _rank_deficient_batch()
    names = [f"layers.{i}.mlp.up_proj" for i in range(4)]
    full_rank = torch.randn(6, 40)
    with pytest.warns(UserWarning, match=r"layers\.\d\.mlp\.up_proj: lora_A is rank-deficient") as record:
        Q = functional.orthonormal_rows(
            [*A.to(_dev(backend)), full_rank], names=[*names, "full"], backend=backend
        )
    assert sorted(str(w.message).split(":")[0] for w in record) == names  # each named, the full one not
    Q = torch.stack(Q[:4]).cpu()
    assert torch.isfinite(Q).all()
    assert _orth_error(Q).max() <= 1e-5
    residual = A.double() - (A.double() @ Q.double().transpose(-1, -2)) @ Q.double()
    assert residual.abs().max() <= 1e-5  # Q's row space contains A's
    ref = reference.orthonormal_rows(A.double())
    for g, first_dependent in enumerate([3, 4, 5, 3]):  # rows before the first dependent one are A's QR
        assert_close(Q[g, :first_dependent], ref[g, :first_dependent], dtype=torch.float32)
    with pytest.warns(UserWarning):
        again = torch.stack(
            functional.orthonormal_rows(list(A.to(_dev(backend))), names=names, backend=backend)
        )
    assert torch.equal(again.cpu(), Q)  # deterministic completion


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_diagonal_counts_as_plus_one(backend):
    """``R_kk = 0`` (a zero row of A) takes the sign +1 on the production paths as in the spec: the torch
    path keeps LAPACK's column, the kernel its completion ``+e_j`` (j the least covered column). Here
    both are the spec's rows exactly; a zero counted as -1 flips that row."""
    cases = [
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),  # R_11 = 0: Q's row 1 is +e_1
        torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]),  # R_00 = 0: row 0 is +e_0
    ]
    for A in cases:
        R = torch.linalg.qr(A.double().T)[1]
        assert (torch.diagonal(R) == 0).any()
        with pytest.warns(UserWarning, match="rank-deficient"):
            (Q,) = functional.orthonormal_rows([A.to(_dev(backend))], backend=backend)
        ref = reference.orthonormal_rows(A.double())
        torch.testing.assert_close(Q.cpu().double(), ref, atol=1e-6, rtol=0)
        zero_row = int((A.abs().sum(dim=1) == 0).nonzero())
        assert Q[zero_row].max() == 1.0  # +e_j: the completion's one entry is positive


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_names_the_layer(backend, bad):
    As = [torch.randn(4, 30), torch.randn(4, 30), torch.randn(2, 9)]
    As[1][2, 7] = bad
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.v_proj: lora_A has non-finite values"):
        functional.orthonormal_rows(As, names=["a", "layers.2.self_attn.v_proj", "c"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_entries_are_not_called_non_finite(backend):
    A = torch.randn(4, 30) * 1e37  # row norms and sums overflow fp32; the entries are finite
    (Q,) = functional.orthonormal_rows([A.to(_dev(backend))], backend=backend)
    assert_close(Q.cpu(), reference.orthonormal_rows(A.double()))


def test_kernel_contract_and_limits():
    from mbf.kernels import ortho

    tau = functional.DEPENDENT_ROW_TOL
    A = torch.randn(2, 5, 21, dtype=torch.float16)
    Qs, status = ortho.orthonormal_rows_many(list(A.to(KERNEL_DEVICE)), tau=tau)
    assert [Q.shape for Q in Qs] == [(5, 21)] * 2 and Qs[0].dtype == torch.float16
    assert status.tolist() == [0, 0]
    assert_close(torch.stack(Qs).cpu(), reference.orthonormal_rows(A.double()))
    with pytest.raises(ValueError, match="rank 6 must be in"):
        ortho.orthonormal_rows_many([torch.randn(6, 5)], tau=tau)
    with pytest.raises(ValueError, match=f"rank {ortho.MAX_RANK + 1} must be in"):
        ortho.orthonormal_rows_many([torch.randn(ortho.MAX_RANK + 1, ortho.MAX_RANK + 1)], tau=tau)


# -- projection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_out_leaves_nothing_of_the_basis(backend, dtype):
    Q = reference.orthonormal_rows(torch.randn(3, 7, 90)).to(dtype)  # (G, r, d)
    U = torch.randn(3, 5, 90).to(dtype)  # (G, k, d)
    P = functional.project_out(U.to(_dev(backend)), Q.to(_dev(backend)), backend=backend).cpu()
    assert P.shape == U.shape and P.dtype == dtype
    assert_close(P, reference.project_out(U.double(), Q.double()))
    if dtype == torch.float32:
        Q64 = Q.double()
        assert (P.double() @ Q64.transpose(-1, -2)).abs().max() <= 1e-5  # nothing of Q's rows left
        removed = U.double() - P.double()  # what was removed lies in Q's row space
        assert_close(removed, (removed @ Q64.transpose(-1, -2)) @ Q64, dtype=torch.float32)
    P2 = functional.project_out(U[1].to(_dev(backend)), Q[1].to(_dev(backend)), backend=backend).cpu()  # 2-D
    assert_close(P2, P[1].double(), dtype=dtype)


def test_project_out_checks_shapes():
    with pytest.raises(ValueError, match=r"U \(3, 5, 90\), Q \(2, 7, 90\)"):
        functional.project_out(torch.randn(3, 5, 90), torch.randn(2, 7, 90))
    with pytest.raises(ValueError, match=r"U \(5, 90\), Q \(7, 91\)"):
        functional.project_out(torch.randn(5, 90), torch.randn(7, 91))


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_out_all_groups_layers(backend):
    shapes = [(4, 30), (4, 30), (2, 17), (4, 30)]
    Qs = functional.orthonormal_rows([torch.randn(s) for s in shapes], backend="torch")
    Us = [torch.randn(s) for s in shapes]
    dev = _dev(backend)
    Ps = functional.project_out_all([U.to(dev) for U in Us], [Q.to(dev) for Q in Qs], backend=backend)
    for U, Q, P in zip(Us, Qs, Ps):
        assert_close(P.cpu(), reference.project_out(U.double(), Q.double()))


# -- ContinualLoRA(orthogonal_updates=True) -------------------------------------------------------


def _strict(model, backend, **kw):
    import mbf

    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model, orthogonal_updates=True, backend=backend, **kw)
    if backend == "triton" and KERNEL_DEVICE == "cuda":
        model.cuda()
    return cl


def _train_a_little(cl, seed):
    """Stand-in for optimizer steps: move every adapter by random amounts, old row space included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cl.layers.values():
            layer.lora_A.add_(0.3 * torch.randn(layer.lora_A.shape, generator=g).to(layer.lora_A.device))
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["orthogonal", "random"])
def test_orthogonal_updates_stay_out_of_the_previous_row_space(tiny_llama, backend, init):
    cl = _strict(tiny_llama, backend, init=init)
    cl.begin_task()
    _train_a_little(cl, 1)
    task1 = {n: layer.lora_A.detach().clone() for n, layer in cl.layers.items()}
    cl.project_updates()  # task 1: nothing to keep away from
    assert all(torch.equal(layer.lora_A, task1[n]) for n, layer in cl.layers.items())
    cl.end_task()
    cl.begin_task()
    start = {n: layer.lora_A.detach().clone() for n, layer in cl.layers.items()}
    _train_a_little(cl, 2)
    raw = {n: layer.lora_A.detach() - start[n] for n, layer in cl.layers.items()}
    cl.project_updates()
    for name, layer in cl.layers.items():
        Q = reference.orthonormal_rows(task1[name].double())  # the previous task's row space
        delta = (layer.lora_A.detach() - start[name]).cpu().double()
        assert (delta @ Q.T).abs().max() <= 1e-5 * raw[name].abs().max()  # nothing of it left
        want = reference.project_out(raw[name].cpu().double(), Q)  # the rest of the update is kept
        assert_close(delta, want, dtype=torch.float32)
    _train_a_little(cl, 3)  # the user forgot project_updates() after these steps: end_task catches it
    cl.end_task()
    for name, layer in cl.layers.items():
        Q = reference.orthonormal_rows(task1[name].double())
        delta = (layer.merged_A - start[name]).cpu().double()
        assert (delta @ Q.T).abs().max() <= 1e-5 * delta.abs().max()


def test_orthogonal_updates_off_is_a_no_op_and_the_option_is_saved(tiny_llama, tmp_path):
    import mbf

    mbf.inject(tiny_llama, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(tiny_llama, backend="torch")
    for seed in (1, 2):
        cl.begin_task()
        _train_a_little(cl, seed)
        before = [layer.lora_A.detach().clone() for layer in cl.layers.values()]
        cl.project_updates()
        assert all(torch.equal(layer.lora_A, b) for layer, b in zip(cl.layers.values(), before))
        cl.end_task()
    strict = mbf.ContinualLoRA(tiny_llama, backend="torch", orthogonal_updates=True)
    strict.save(tmp_path / "ckpt")
    assert mbf.ContinualLoRA.load(tiny_llama, tmp_path / "ckpt").config.orthogonal_updates

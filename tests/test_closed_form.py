"""The runtime math (``mbf.closed_form``): by hand where it is defined once, against the float64 spec
(``mbf.reference``) where the spec states it independently."""

import math

import pytest
import torch
from conftest import assert_close

from mbf import closed_form, reference


def test_schedules_by_hand():
    lam = closed_form.lam_schedule
    assert [lam("sqrt", i) for i in (1, 4)] == [1.0, 0.5]
    assert lam("sqrt", 3) == pytest.approx(1 / math.sqrt(3))
    assert lam("inverse", 4) == 0.25
    assert lam("constant", 3, constant=0.3) == 0.3
    assert lam("none", 9) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        lam("cosine", 2)
    with pytest.raises(ValueError, match="task index 0 must be >= 1"):
        lam("sqrt", 0)


@pytest.mark.parametrize("schedule", closed_form.SCHEDULES)
@pytest.mark.parametrize("constant", [0.3, 0.5, 1.0])
def test_task_one_gets_lambda_one_on_every_schedule(schedule, constant):
    """λ(1) = 1 whatever the schedule and its constant: after task 1 merged = fine-tuned (DESIGN step 3).
    ``sqrt`` and ``inverse`` give 1 at i = 1 by their formula anyway; ``constant`` c must not."""
    assert closed_form.lam_schedule(schedule, 1, constant=constant) == 1.0
    want_2 = {"sqrt": 2**-0.5, "inverse": 0.5, "constant": constant, "none": 1.0}[schedule]
    assert closed_form.lam_schedule(schedule, 2, constant=constant) == pytest.approx(want_2, rel=1e-15)


def test_work_dtype_is_fp32_but_for_float64():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert closed_form.work_dtype(dtype) == torch.float32
    assert closed_form.work_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("shape", [(5, 33), (3, 4, 33)])  # one matrix, a batch of them
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_project_out_is_the_spec(shape, dtype):
    """The batched ``U − (U Qᵀ) Q`` against the spec's one-basis-vector-at-a-time sum, in fp32 for half
    inputs (returned in U's dtype)."""
    g = torch.Generator().manual_seed(0)
    *batch, k, d = shape
    Q = reference.orthonormal_rows(torch.randn(*batch, 3, d, dtype=torch.float64, generator=g))
    U = torch.randn(*batch, k, d, dtype=torch.float64, generator=g).to(dtype)
    got = closed_form.project_out(U, Q.to(dtype))
    assert got.dtype == dtype and got.shape == U.shape
    assert_close(got, reference.project_out(U.double(), Q), dtype)


def test_inflora_row_scale_is_one_over_root_three():
    """The designed rows' norm, 3^-1/2 = 0.5773502691896258 (a number, not the constant itself): the
    expected norm² of a Kaiming-uniform (a = √5) row, U(±1/√in) over ``in`` entries: in · (1/in) / 3."""
    assert closed_form.INFLORA_SCALE == pytest.approx(0.5773502691896258, rel=1e-15)
    A = torch.empty(256, 4096, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # what mbf's LoRALinear draws for lora_A
    assert (A * A).sum(dim=1).mean().item() == pytest.approx(1 / 3, rel=0.01)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, dtype=torch.float64, generator=g)
    rows = closed_form.inflora_design(X.T @ X / 50, torch.zeros(6, 0, dtype=torch.float64), "remove", 2)
    assert_close(rows.norm(dim=1), torch.full((2,), 0.5773502691896258, dtype=torch.float64), torch.float64)


def test_free_projector_by_hand():
    M = torch.eye(4, dtype=torch.float64)[:, :1]  # e0 protected ("remove") or e0 free ("retain")
    diag = lambda *v: torch.diag(torch.tensor(v, dtype=torch.float64))  # noqa: E731
    assert torch.equal(closed_form.free_projector(M, "remove"), diag(0, 1, 1, 1))
    assert torch.equal(closed_form.free_projector(M, "retain"), diag(1, 0, 0, 0))

"""Per-task LoRA merging's math: task arithmetic and TIES on hand-made task vectors (the reference against
hand counts), the layer-by-layer fp32 path against the float64 reference, and the low-rank variant."""

import pytest
import torch
from conftest import assert_close

from mbf import reference
from mbf.functional.task_merge import low_rank_factors, merge_task_vectors, task_vector, ties_thresholds

F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def test_task_arithmetic_by_hand():
    t1, t2 = _t([[1.0, -2.0], [0.5, 0.0]]), _t([[3.0, 1.0], [-0.5, 4.0]])
    want = 0.4 * _t([[4.0, -1.0], [0.0, 4.0]])
    torch.testing.assert_close(reference.task_arithmetic(torch.stack([t1, t2]), 0.4), want)


def test_ties_trim_keeps_each_tasks_top_magnitudes():
    # 6 entries, density 1/3: each task keeps its 2 largest magnitudes
    d = _t([[[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]], [[-1.0, 0.5, 0.4], [0.3, -0.1, 0.9]]])
    want = _t([[[0.0, -5.0, 0.0], [2.0, 0.0, 0.0]], [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.9]]])
    torch.testing.assert_close(reference.ties_trim(d, 1 / 3), want)
    # a tie with the k-th magnitude is kept (the paper's >= threshold)
    tied = reference.ties_trim(_t([[3.0, -3.0, 1.0, 0.5]]), 0.25)
    torch.testing.assert_close(tied, _t([[3.0, -3.0, 0.0, 0.0]]))
    # at least one entry survives a tiny density
    torch.testing.assert_close(reference.ties_trim(_t([[0.2, -0.7, 0.1]]), 0.01), _t([[0.0, -0.7, 0.0]]))


def test_ties_merge_by_hand():
    # three tasks, 2x3, density 1 (no trim) to see elect + disjoint mean alone, then with a trim
    t1 = _t([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t2 = _t([[3.0, 1.0, -0.5], [2.0, -1.0, -2.0]])
    t3 = _t([[-1.0, -4.0, 0.5], [-2.0, 0.5, 4.0]])
    d = torch.stack([t1, t2, t3])
    # sums: [[3, -5, 0.5], [0, 2.5, 1]] -> signs [[+, -, +], [0, +, +]]
    # (0,0): + agrees t1, t2 -> (1 + 3) / 2 = 2;  (0,1): - agrees t1, t3 -> (-2 - 4) / 2 = -3
    # (0,2): + agrees t1, t3 -> 0.5;  (1,0): sum 0 -> 0;  (1,1): + agrees t1, t3 -> 1.75;  (1,2): + t3 -> 4
    want = _t([[2.0, -3.0, 0.5], [0.0, 1.75, 4.0]])
    torch.testing.assert_close(reference.ties_merge(d, density=1.0, lam=1.0), want)
    torch.testing.assert_close(reference.ties_merge(d, density=1.0, lam=0.5), 0.5 * want)
    # density 1/3 (2 of 6 per task): t1 keeps 3 and -2; t2 keeps 3 and its tied 2, -2; t3 keeps -4, 4.
    # trimmed sums [[3, -6, 0], [2, 3, 2]]: (0,1) mean of -2, -4; (1,2) elects + so t2's -2 is dropped
    want_trim = _t([[3.0, -3.0, 0.0], [2.0, 3.0, 4.0]])
    torch.testing.assert_close(reference.ties_merge(d, density=1 / 3), want_trim)


def test_ties_disagreeing_values_do_not_cancel_but_are_dropped():
    # task arithmetic would average +4 and -1 to 1.5; TIES elects + and keeps 4 (the minority is dropped)
    d = _t([[[4.0]], [[-1.0]]])
    torch.testing.assert_close(reference.ties_merge(d, density=1.0), _t([[4.0]]))
    torch.testing.assert_close(reference.task_arithmetic(d, 0.5), _t([[1.5]]))


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_by_layer_fp32_path_matches_the_reference_on_the_whole_task_vector(merge, dtype):
    """Odd layer shapes, three tasks; the trim threshold of each task is over all its layers."""
    shapes = [(5, 3), (1, 7), (9, 4)]
    T, lam, density = 3, 0.7, 0.23
    tasks = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(T)]
    lowp = [[d.to(dtype) for d in layers] for layers in tasks]
    thr = ties_thresholds(lowp, density) if merge == "ties" else None
    got = []
    for li, s in enumerate(shapes):
        out = merge_task_vectors([lowp[t][li] for t in range(T)], merge, lam=lam, thresholds=thr)
        assert out.dtype == torch.float32 and out.shape == s
        got.append(out.reshape(-1))
    # the spec on the whole model's task vectors (T, N) of the same (rounded) inputs: the merge runs in fp32
    flat = torch.stack([torch.cat([d.double().reshape(-1) for d in layers]) for layers in lowp])
    spec = (
        reference.ties_merge(flat, density, lam) if merge == "ties" else reference.task_arithmetic(flat, lam)
    )
    assert_close(torch.cat(got), spec, dtype=torch.float32)


def test_ties_without_thresholds_trims_each_layer_on_its_own():
    d = [torch.randn(6, 5), torch.randn(6, 5)]
    got = merge_task_vectors(d, "ties", lam=1.0, density=0.3)
    assert_close(got, reference.ties_merge(torch.stack(d).double(), 0.3), dtype=torch.float32)


def test_task_vector_is_the_scaled_product():
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    assert_close(task_vector(A, B, 2.5), 2.5 * B.double() @ A.double(), dtype=torch.float32)


def test_low_rank_factors_are_the_best_rank_r_approximation():
    delta = torch.randn(9, 6, dtype=torch.float32)
    A, B = low_rank_factors(delta, 2, scaling=2.0)
    assert A.shape == (2, 6) and B.shape == (9, 2)
    assert_close(A @ A.T, torch.eye(2, dtype=F64), dtype=torch.float32)  # orthonormal rows
    S = torch.linalg.svdvals(delta.double())
    err = torch.linalg.matrix_norm((2.0 * B @ A - delta).double())
    assert err.item() == pytest.approx(S[2:].square().sum().sqrt().item(), rel=1e-4)  # Eckart–Young
    # a rank-2 delta is reproduced exactly
    exact = torch.randn(9, 2) @ torch.randn(2, 6)
    A, B = low_rank_factors(exact, 2, scaling=0.5)
    assert_close(0.5 * B @ A, exact.double(), dtype=torch.float32)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="merge='mean' must be one of"):
        merge_task_vectors([torch.zeros(2, 2)], "mean", lam=1.0)
    with pytest.raises(ValueError, match="different shapes"):
        merge_task_vectors([torch.zeros(2, 2), torch.zeros(2, 3)], "ties", lam=1.0)
    with pytest.raises(ValueError, match="density=0 must be in"):
        ties_thresholds([[torch.ones(2)]], 0)
    with pytest.raises(ValueError, match=r"\(2,\) thresholds for 1 tasks"):
        merge_task_vectors([torch.ones(2, 2)], "ties", lam=1.0, thresholds=torch.ones(2))
    with pytest.raises(ValueError, match="rank 7 must be an integer in"):
        low_rank_factors(torch.ones(3, 4), 7, 1.0)

"""Sketch-merge: its closed-form steps (mbf.reference) by hand, the strategy against that float64 spec on
the tiny Llama over three tasks, its fixed budget, the shared q/v sketch, and its checkpoint."""

import pytest
import torch
from conftest import assert_close
from fixtures.tiny import tiny_llama
from test_inflora import _layer_inputs

import mbf
from mbf.closed_form import inflora_design, lam_schedule
from mbf.reference import bounded_merge, sketch_update, sketch_weight
from mbf.strategies import load_strategy, make_strategy
from mbf.strategies.sketch import SketchMerge, SketchMergeConfig

LORA = mbf.LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
F64 = torch.float64


def _model():
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    return model


# -- the closed-form steps, by hand ----------------------------------------------------------------


def test_sketch_keeps_the_top_k_directions_of_the_summed_covariances():
    """Task 1 energies 5, 3, 1, 0, 0 on e0..e4, k = 2: e0, e1 (5, 3); e2's 1 is forgotten. Task 2 adds
    0, 0, 4, 0, 1: the sketch plus it is 5, 3, 4, 0, 1, so e0 and e2 (5, 4) are kept and e1 (3) is dropped;
    τ counts all energy, forgotten or not (9 + 5)."""
    M, e, tau = sketch_update(torch.diag(torch.tensor([5.0, 3, 1, 0, 0], dtype=F64)),
                              torch.zeros(5, 0, dtype=F64), torch.zeros(0, dtype=F64), 0.0, 2)  # fmt: skip
    assert_close(e, torch.tensor([5.0, 3.0], dtype=F64), F64)
    assert_close(M.abs(), torch.eye(5, dtype=F64)[:, :2], F64)
    M, e, tau = sketch_update(torch.diag(torch.tensor([0.0, 0, 4, 0, 1], dtype=F64)), M, e, tau, 2)
    assert_close(e, torch.tensor([5.0, 4.0], dtype=F64), F64)
    assert_close(M @ M.T, torch.diag(torch.tensor([1.0, 0, 1, 0, 0], dtype=F64)), F64)
    assert tau == pytest.approx(14.0)


def test_the_weight_is_the_root_of_the_sketch_plus_the_spread_remainder():
    """G² = M diag(e) Mᵀ + δ (I − M Mᵀ) with δ = (τ − Σe) / (in − k): here (14 − 10) / 3."""
    M = torch.eye(5, dtype=F64)[:, [0, 2]]
    e = torch.tensor([5.0, 5.0], dtype=F64)
    G = sketch_weight(M, e, 14.0)
    want = torch.diag(torch.tensor([5.0, 4 / 3, 5.0, 4 / 3, 4 / 3], dtype=F64))
    assert_close(G @ G, want, F64)


def test_the_merge_is_exact_within_the_rank_and_weights_what_past_inputs_excite():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(6, 3, generator=g, dtype=F64) @ torch.randn(3, 5, generator=g, dtype=F64)  # rank 3
    G = torch.diag(torch.tensor([3.0, 1, 1, 1, 1], dtype=F64))
    A, B = bounded_merge(D, G, rank=4)
    assert A.shape == (3, 5) and B.shape == (6, 3)  # the rank it has, not the budget
    assert_close(B @ A, D, F64)
    # rank 1 of diag(1, 1e-3) in the plain norm keeps e0; weighting input e1 by 1e3 makes it keep e1
    D = torch.diag(torch.tensor([1.0, 1e-3], dtype=F64))
    A, B = bounded_merge(D, torch.eye(2, dtype=F64), rank=1)
    assert_close(B @ A, torch.diag(torch.tensor([1.0, 0], dtype=F64)), F64)
    A, B = bounded_merge(D, torch.diag(torch.tensor([1.0, 1e4], dtype=F64)), rank=1)
    assert_close(B @ A, torch.diag(torch.tensor([0.0, 1e-3], dtype=F64)), F64)


# -- the strategy against the spec ---------------------------------------------------------------


def test_strategy_matches_the_float64_spec_over_three_tasks_in_a_fixed_budget():
    model = _model()
    cl = SketchMerge(model, rank=3, sketch=5, schedule="sqrt")
    g = torch.Generator().manual_seed(1)
    names = list(cl.layers)
    sketch = {n: (torch.zeros(48, 0, dtype=F64), torch.zeros(0, dtype=F64), 0.0) for n in names}
    past = dict.fromkeys(names)  # float64 P_B P_A, per layer
    sizes = []
    for task in range(3):
        ids = torch.randint(2, 90, (3, 11), generator=g)
        covs = _layer_inputs(model, cl.layers, ids)
        cl.observe_inputs(lambda ids=ids: model(input_ids=ids))
        cl.begin_task()
        for n, layer in cl.layers.items():
            want = inflora_design(covs[n], sketch[n][0], "remove", LORA.r)
            assert_close(layer.lora_A, want, torch.float32)
            if task:  # off the remembered directions
                overlap = layer.lora_A.double() @ sketch[n][0]
                assert_close(overlap, torch.zeros_like(overlap), torch.float32)
        assert cl.trainable_parameters() == [layer.lora_B for layer in cl.layers.values()]
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        new = {n: layer.lora_B.double() @ layer.lora_A.double() for n, layer in cl.layers.items()}
        covs = _layer_inputs(model, cl.layers, ids)
        cl.observe_inputs(lambda ids=ids: model(input_ids=ids))
        cl.end_task()
        lam = lam_schedule("sqrt", task + 1)
        for n in names:
            sketch[n] = sketch_update(covs[n], *sketch[n], 5)
            D = lam * new[n] + (0 if past[n] is None else past[n])
            A, B = bounded_merge(D, sketch_weight(*sketch[n]), 3)
            past[n] = B @ A
            assert_close(cl.memory[n] @ cl.memory[n].T, sketch[n][0] @ sketch[n][0].T, torch.float32)
            assert_close(cl.branches.B[n].double() @ cl.branches.A[n].double(), past[n], torch.float32)
            assert cl.branches.A[n].shape[0] == min(3, 2 * (task + 1))
        sizes.append(cl.adapter_bytes())
    assert sizes[1] == sizes[2]  # the budget is full after task 2 and stays fixed
    # q_proj and v_proj read the same input: one sketch, counted once
    q, v = (n for n in names if ".0." in n)
    assert cl.group[v] == q and cl.memory[v] is cl.memory[q]
    assert sum(k.endswith(".memory") for k in cl._tensors()) == len(names) // 2


def test_the_layer_computes_the_merged_past_plus_the_current_task(tmp_path):
    """Between tasks the model is W0 + the merged adapter; a save/load keeps it bit for bit."""
    model = _model()
    cl = make_strategy(model, SketchMergeConfig(rank=2, sketch=4))
    ids = torch.randint(2, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    cl.observe_inputs(lambda: model(input_ids=ids))
    cl.begin_task()
    with torch.no_grad():
        for layer in cl.layers.values():
            layer.lora_B.normal_()
        want = model(input_ids=ids).logits
    cl.observe_inputs(lambda: model(input_ids=ids))
    cl.end_task()
    with torch.no_grad(), cl.merged():
        got = model(input_ids=ids).logits
    assert_close(got, want, torch.float32)  # rank 2 = r: the merge is exact; B_t zeroed, no double count
    cl.save(tmp_path / "ck")
    back = load_strategy(_model(), tmp_path / "ck")
    assert isinstance(back, SketchMerge) and back.task_index == 1 and back.group == cl.group
    with torch.no_grad(), back.merged():
        assert torch.equal(back.model(input_ids=ids).logits, got)


@pytest.mark.parametrize(
    "options, match",
    [({"rank": 0}, "rank=0"), ({"sketch": 48}, "sketch=48"), ({"schedule": "x"}, "schedule='x'"),
     ({"rank": 99}, "rank=99")],
)  # fmt: skip
def test_bad_budgets_are_refused_naming_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        SketchMerge(_model(), **options)

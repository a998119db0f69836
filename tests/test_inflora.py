"""InfLoRA: its closed-form steps (mbf.closed_form, run in float64) on hand-made activations, the strategy
against them in float64 on the tiny Llama, its checkpoint (resume and the command line: test_olora.py)."""

import json

import pytest
import torch
from conftest import assert_close
from fixtures.tiny import tiny_llama

import mbf
from mbf.checkpoint import META
from mbf.closed_form import INFLORA_SCALE, dualgpm_update, inflora_design
from mbf.strategies import load_strategy
from mbf.strategies.inflora import InfLoRA, InfLoRAConfig

LORA = mbf.LoRAConfig(r=2, alpha=4)
F64 = torch.float64


def _diag(*energies) -> torch.Tensor:
    return torch.diag(torch.tensor(energies, dtype=F64))


def _basis(*axes, n=5) -> torch.Tensor:
    return torch.eye(n, dtype=F64)[:, list(axes)]


def _span(M: torch.Tensor) -> torch.Tensor:
    return M @ M.T  # the projector: the same for any orthonormal basis of the subspace


def _same_span(M: torch.Tensor, want: torch.Tensor) -> None:
    assert_close(_span(M), _span(want), F64)


# -- the closed-form steps, by hand ----------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold, protected, kind",
    [(0.7, (0, 1), "remove"), (0.8, (0, 1), "remove"), (0.81, (0, 1, 2), "retain"), (0.45, (0,), "remove")],
)
def test_first_update_keeps_the_fewest_directions_reaching_the_threshold(threshold, protected, kind):
    """Energies 5, 3, 1, 0.6, 0.4 of 10: 50 %, 80 %, 90 %... ε = 0.8 keeps e0, e1 (80 % ≥ ε); ε = 0.81
    needs e0..e2, more than in/2 = 2.5 columns, so the complement e3, e4 is stored ("retain")."""
    C = _diag(5, 3, 1, 0.6, 0.4)
    M, got_kind = dualgpm_update(C, torch.zeros(5, 0, dtype=F64), "remove", threshold)
    want = _basis(*protected) if kind == "remove" else _basis(*[i for i in range(5) if i not in protected])
    assert got_kind == kind
    _same_span(M, want)


def test_later_updates_count_what_is_protected_already():
    """Memory e0, e1 (remove). Task 2's energies 1, 0, 4, 3, 2 (of 10): 10 % already protected; the free
    part's directions e2, e3, e4 bring it to 50, 80, 100 %."""
    C, M = _diag(1, 0, 4, 3, 2), _basis(0, 1)
    M2, kind = dualgpm_update(C, M, "remove", 0.45)  # e2 too: 3 columns > 2.5, stored as e3, e4
    assert kind == "retain"
    _same_span(M2, _basis(3, 4))
    M2, kind = dualgpm_update(C, M, "remove", 0.75)  # e2, e3 too: stored as e4
    assert kind == "retain"
    _same_span(M2, _basis(4))
    M2, kind = dualgpm_update(_diag(6, 4, 0, 0, 0), M, "remove", 0.99)  # all protected: nothing added
    assert kind == "remove"
    _same_span(M2, M)


def test_retained_memory_shrinks_by_the_new_directions():
    """Free subspace e2, e3, e4 ("retain": the rest is protected). Task energies 2, 0, 5, 1, 2: 20 %
    protected; the free part's e2 (50 %) brings it to 70 %, e4 to 90 %."""
    C, free = _diag(2, 0, 5, 1, 2), _basis(2, 3, 4)
    M, kind = dualgpm_update(C, free, "retain", 0.6)
    assert kind == "retain"
    _same_span(M, _basis(3, 4))
    M, kind = dualgpm_update(C, free, "retain", 0.85)
    assert kind == "retain"
    _same_span(M, _basis(3))


def test_designed_rows_are_the_top_free_directions_and_orthogonal_to_the_memory():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 7, dtype=F64, generator=g) * torch.tensor([3, 2.5, 2, 1.5, 1, 0.7, 0.5], dtype=F64)
    C = X.T @ X / 40
    M, _ = torch.linalg.qr(torch.randn(7, 2, dtype=F64, generator=g))
    A = inflora_design(C, M, "remove", 3)
    assert A.shape == (3, 7)
    assert_close(A @ A.T, torch.eye(3, dtype=F64) / 3, F64)  # orthogonal rows, norm 1/√3 (a number)
    assert_close(A @ M, torch.zeros(3, 2, dtype=F64), F64)  # off the protected subspace
    P = torch.eye(7, dtype=F64) - M @ M.T
    vals, vecs = torch.linalg.eigh(P @ C @ P)  # the same subspace found another way: the top 3
    assert_close(_span(A.T / INFLORA_SCALE), _span(vecs[:, -3:]), F64)
    # "retain" stores the free subspace itself: the same design
    free, _ = torch.linalg.qr(torch.cat([M, torch.randn(7, 5, dtype=F64, generator=g)], 1))
    assert_close(inflora_design(C, free[:, 2:], "retain", 3), A, F64)


def test_rank_deficient_inputs_still_give_rows_off_the_memory():
    """One input direction (e0 + e5) but r = 3: the other two rows come from the unprotected subspace."""
    x = torch.zeros(7, dtype=F64)
    x[0] = x[5] = 1.0
    M = _basis(1, 2, n=7)
    A = inflora_design(torch.outer(x, x), M, "remove", 3)
    assert_close(A @ M, torch.zeros(3, 2, dtype=F64), F64)
    assert_close(A @ A.T, torch.eye(3, dtype=F64) / 3, F64)
    assert_close(A[0].abs(), INFLORA_SCALE * x / x.norm(), F64)  # the input direction first


# -- the strategy on the tiny Llama, against the spec -------------------------------------------------


def _layer_inputs(model, layers, ids) -> dict:
    """Each layer's input covariance in float64, captured independently of InfLoRA's own hooks."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in layers.items()]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        out[n] = x.T @ x / x.shape[0]
    return out


def test_strategy_matches_the_float64_spec_over_two_tasks():
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    cl = InfLoRA(model, threshold=0.9)
    g = torch.Generator().manual_seed(1)
    memory = {n: torch.zeros(48, 0, dtype=F64) for n in cl.layers}
    kinds = dict.fromkeys(cl.layers, "remove")
    for task in range(2):
        ids = torch.randint(2, 90, (3, 11), generator=g)
        covs = _layer_inputs(model, cl.layers, ids)
        cl.observe_inputs(lambda ids=ids: model(input_ids=ids))
        cl.begin_task()
        for name, layer in cl.layers.items():
            want = inflora_design(covs[name], memory[name], kinds[name], LORA.r)
            assert_close(layer.lora_A, want, torch.float32)
            if task:  # off everything the first task protected
                overlap = layer.lora_A.double() @ memory[name]  # (r, k)
                assert_close(overlap, torch.zeros_like(overlap), torch.float32)
            assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.lora_B.any()
        assert cl.trainable_parameters() == [layer.lora_B for layer in cl.layers.values()]
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        covs = _layer_inputs(model, cl.layers, ids)  # after training: the trained branch changes the inputs
        cl.observe_inputs(lambda ids=ids: model(input_ids=ids))
        cl.end_task()
        for name in cl.layers:
            memory[name], kinds[name] = dualgpm_update(covs[name], memory[name], kinds[name], 0.9)
            assert cl.kind[name] == kinds[name] and cl.memory[name].shape == memory[name].shape
            assert_close(_span(cl.memory[name]), _span(memory[name]), torch.float32)
    assert cl.task_index == 2 and cl.branches.A[next(iter(cl.layers))].shape[0] == 2 * LORA.r


def test_inputs_must_be_observed_and_options_are_checked():
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    cl = InfLoRA(model)
    with pytest.raises(RuntimeError, match="begin_task: call observe_inputs"):
        cl.begin_task()
    ids = torch.randint(2, 90, (1, 5))
    cl.observe_inputs(lambda: model(input_ids=ids))
    cl.begin_task()
    with pytest.raises(RuntimeError, match="end_task: call observe_inputs"):
        cl.end_task()
    assert cl.in_task  # still open
    with pytest.raises(ValueError, match="saw no input"):
        cl.observe_inputs(lambda: None)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold=.* must be in \\(0, 1\\)"):
            InfLoRAConfig(threshold=bad)


def test_checkpoint_keeps_the_memory_and_refuses_a_bad_one(tmp_path):
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    cl = InfLoRA(model, threshold=0.8)
    ids = torch.randint(2, 90, (2, 9))
    for _ in range(2):
        cl.observe_inputs(lambda: model(input_ids=ids))
        cl.begin_task()
        cl.observe_inputs(lambda: model(input_ids=ids))
        cl.end_task()
    cl.save(tmp_path / "ck")
    back = load_strategy(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")
    assert type(back) is InfLoRA and back.config.threshold == 0.8 and back.kind == cl.kind
    for name in cl.layers:
        assert torch.equal(back.memory[name], cl.memory[name])
    assert back.adapter_bytes() == cl.adapter_bytes() > 0
    meta = json.loads((tmp_path / "ck" / META).read_text())
    meta["strategy_state"]["memory_kind"][next(iter(cl.layers))] = "keep"
    (tmp_path / "ck" / META).write_text(json.dumps(meta))
    # refused by its checksum (the tensor file's metadata holds each field's)
    with pytest.raises(ValueError, match="continual.json: strategy_state: not what was saved"):
        load_strategy(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")
    # a checkpoint older than that checksum (its tensor file's metadata without it): the value is checked
    from safetensors.torch import load_file, save_file

    from mbf.checkpoint import FORMAT, _sha256

    tensors = tmp_path / "ck" / meta["tensors_file"]
    save_file(load_file(tensors), tensors, metadata={"mbf": FORMAT})
    (tmp_path / "ck" / META).write_text(json.dumps({**meta, "tensors_sha256": _sha256(tensors)}))
    with pytest.raises(ValueError, match="memory kind 'keep' must be one of remove, retain"):
        load_strategy(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")


def test_the_released_codes_epsilon_ramp_rises_linearly_and_stays_below_one():
    """0.95 → 1.0 over T = 4: ε after tasks 1..4 is 0.95, 0.9625, 0.975, 0.9875 (the code's
    ``(lame − lamb) · cur_task / total_sessions + lamb``); without a ramp ε is the constant."""
    ramp = InfLoRAConfig(threshold=0.95, threshold_end=1.0, tasks=4)
    assert [ramp.epsilon(t) for t in range(5)] == pytest.approx([0.95, 0.9625, 0.975, 0.9875, 0.9875])
    assert InfLoRAConfig(threshold=0.9).epsilon(3) == 0.9
    for bad in ({"threshold_end": 1.0}, {"tasks": 4}, {"threshold_end": 0.5, "tasks": 4},
                {"threshold_end": 1.5, "tasks": 4}):  # fmt: skip
        with pytest.raises(ValueError, match="threshold_end|tasks"):
            InfLoRAConfig(threshold=0.95, **bad)


def test_the_ramp_reaches_the_memory_update(monkeypatch):
    """The strategy passes ε_t of the task it closes to DualGPM's update."""
    import mbf.strategies.inflora as inflora_module

    seen = []
    real = inflora_module.dualgpm_update
    spy = lambda c, m, k, eps: seen.append(eps) or real(c, m, k, eps)  # noqa: E731
    monkeypatch.setattr(inflora_module, "dualgpm_update", spy)
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    cl = InfLoRA(model, threshold=0.9, threshold_end=1.0, tasks=2)
    ids = torch.randint(2, 90, (2, 7))
    for _ in range(2):
        cl.observe_inputs(lambda: model(input_ids=ids))
        cl.begin_task()
        cl.observe_inputs(lambda: model(input_ids=ids))
        cl.end_task()
    assert sorted(set(seen)) == pytest.approx([0.9, 0.95])


def test_q_and_v_share_one_memory_stored_and_counted_once(tmp_path):
    """q_proj and v_proj read the same input, so DualGPM gives them bit-equal bases: the checkpoint holds one
    tensor per distinct basis, adapter_bytes counts it once, and a load gives every layer its basis back."""
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    cl = InfLoRA(model, threshold=0.8)
    ids = torch.randint(2, 90, (2, 9))
    cl.observe_inputs(lambda: model(input_ids=ids))
    cl.begin_task()
    cl.observe_inputs(lambda: model(input_ids=ids))
    cl.end_task()
    shared = cl._shared_memory()
    q = [n for n in cl.layers if n.endswith("q_proj")]
    assert shared == {n.replace("q_proj", "v_proj"): n for n in q}  # every v_proj points at its q_proj
    each = sum(m.numel() * m.element_size() for m in cl.memory.values())
    once = sum(cl.memory[n].numel() * cl.memory[n].element_size() for n in q)
    assert 0 < once < each and cl.adapter_bytes() == sum(
        t.numel() * t.element_size() for k, t in cl._tensors().items() if not k.endswith(".memory")
    ) + once
    cl.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / META).read_text())
    assert meta["strategy_state"]["memory_shared"] == shared
    back = load_strategy(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")
    for name in cl.layers:
        assert torch.equal(back.memory[name], cl.memory[name])
    assert back.adapter_bytes() == cl.adapter_bytes()
    # a map naming a layer whose memory is saved, or one without a saved memory to share, is refused
    bad = {**shared, q[0]: q[1]}
    with pytest.raises(ValueError, match="memory_shared=.* must map layers without a saved memory"):
        back._load_extra(dict(back._extra_tensors()), {"memory_kind": dict(back.kind), "memory_shared": bad})

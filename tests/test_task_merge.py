"""TaskMergeLoRA: one LoRA per task from the same start, merged by task arithmetic / TIES after each task."""

import pytest
import torch
from conftest import assert_close, make_tiny_llama

import mbf
from mbf import reference
from mbf.strategies.task_merge import TaskMergeConfig, TaskMergeLoRA

R = 4


def _setup(model, **kw):
    mbf.inject(model, mbf.LoRAConfig(r=R, alpha=8, target_modules=("q_proj", "v_proj")))
    return TaskMergeLoRA(model, TaskMergeConfig(**kw))


@torch.no_grad()
def _train(cm, g):
    for layer in cm.layers.values():
        layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g))


def _run_tasks(cm, n, seed=0):
    g, trained = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        cm.begin_task()
        _train(cm, g)
        trained.append(
            {k: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for k, m in cm.layers.items()}
        )
        cm.end_task()
    return trained


def _spec(cm, trained, cfg):
    """Per layer, the float64 reference merge over the whole model's task vectors."""
    names = list(cm.layers)
    vecs = [[(cm.layers[n].scaling * B.double() @ A.double()) for n, (A, B) in ((n, t[n]) for n in names)]
            for t in trained]  # fmt: skip
    flat = torch.stack([torch.cat([v.reshape(-1) for v in task]) for task in vecs])
    if cfg.merge == "ties":
        merged = reference.ties_merge(flat, cfg.density, cfg.lam)
    else:
        merged = reference.task_arithmetic(flat, cfg.lam)
    out, offset = {}, 0
    for n, v in zip(names, vecs[0]):
        out[n] = merged[offset : offset + v.numel()].reshape(v.shape)
        offset += v.numel()
    return out


def nn_linear(layer, x):
    return torch.nn.functional.linear(x, layer.base.weight, layer.base.bias)


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
def test_every_task_starts_from_the_same_adapter_and_the_merge_is_the_reference(tiny_llama, merge):
    cm = _setup(tiny_llama, merge=merge)
    start = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in cm.layers.items()}
    assert all(not B.any() for _, B in start.values())  # the usual LoRA init: B = 0
    g = torch.Generator().manual_seed(1)
    trained = []
    for i in range(3):
        cm.begin_task()
        for n, m in cm.layers.items():  # the same start, whatever the previous task learned
            assert torch.equal(m.lora_A, start[n][0]) and torch.equal(m.lora_B, start[n][1])
        _train(cm, g)
        trained.append(
            {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in cm.layers.items()}
        )
        cm.end_task()
        assert cm.task_index == i + 1 and len(cm.kept) == i + 1
        spec = _spec(cm, trained, cm.config)
        for n, layer in cm.layers.items():
            x = torch.randn(3, 5, layer.in_features)
            base = nn_linear(layer, x)
            with cm.merged():
                assert_close(layer(x), (base.double() + x.double() @ spec[n].T), dtype=torch.float32)
            with cm.adapter_mode("finetuned"):  # the task's own LoRA alone, without the merge
                A, B = trained[-1][n]
                want = base.double() + layer.scaling * (x.double() @ A.double().T) @ B.double().T
                assert_close(layer(x), want, dtype=torch.float32)


def test_eval_uses_the_merge_after_the_first_task_and_training_the_current_lora(tiny_llama):
    cm = _setup(tiny_llama, merge="task_arithmetic", lam=0.5)
    layer = next(iter(cm.layers.values()))
    x = torch.randn(2, layer.in_features)
    _run_tasks(cm, 2)
    cm.begin_task()  # task 3: the LoRA is back at its start (B = 0): training computes the base alone
    layer.train()
    torch.testing.assert_close(layer(x), nn_linear(layer, x))
    layer.eval()  # eval() computes with the merge of tasks 1..2
    with torch.no_grad():
        in_eval = layer(x)
    with torch.no_grad(), cm.merged():
        torch.testing.assert_close(in_eval, layer(x))
    assert not torch.allclose(in_eval, nn_linear(layer, x))


def test_low_rank_variant_keeps_the_truncated_svd_as_the_merged_adapter(tiny_llama):
    cm = _setup(tiny_llama, merge="ties", low_rank=True)
    trained = _run_tasks(cm, 2)
    spec = _spec(cm, trained, cm.config)
    assert cm.deltas is None
    for n, layer in cm.layers.items():
        got = layer.scaling * layer.merged_B.double() @ layer.merged_A.double()
        U, S, Vh = torch.linalg.svd(spec[n])
        best = (U[:, :R] * S[:R]) @ Vh[:R]
        assert_close(got, best, dtype=torch.float32)
        x = torch.randn(2, layer.in_features)
        with cm.merged():  # the layer's own merged mode, no delta added
            assert_close(layer(x), nn_linear(layer, x).double() + x.double() @ got.T, dtype=torch.float32)


def test_state_round_trip_gives_the_same_model(tiny_llama):
    cm = _setup(tiny_llama)
    _run_tasks(cm, 2)
    cm.begin_task()
    _train(cm, torch.Generator().manual_seed(9))  # mid-task: the current LoRA is saved too
    state = cm.state_dict()
    other = _setup(make_tiny_llama())
    other.load_state_dict(state)
    assert (other.task_index, other.in_task) == (2, True)
    ids = torch.randint(0, 90, (2, 7))
    for mode in ("merged", "finetuned"):
        with cm.adapter_mode(mode), other.adapter_mode(mode):
            torch.testing.assert_close(other.model(ids).logits, cm.model(ids).logits)


def test_adapter_bytes_by_hand(tiny_llama):
    cm = _setup(tiny_llama, merge="ties")
    shapes = [(m.in_features, m.out_features) for m in cm.layers.values()]
    factors = sum(R * (i + o) * 4 for i, o in shapes)  # one adapter: r (in + out) fp32 per layer
    dense = sum(i * o * 4 for i, o in shapes)  # the merged ΔW of every layer
    assert cm.adapter_bytes() == 2 * factors  # the shared start and the current LoRA
    for t in (1, 2, 3):
        _run_tasks(cm, 1, seed=t)
        assert cm.adapter_bytes() == (2 + t) * factors + dense  # + one kept adapter per task
    low = _setup(make_tiny_llama(), low_rank=True)
    _run_tasks(low, 2)
    assert low.adapter_bytes() == (2 + 2 + 1) * factors  # the merged adapter instead of the dense ΔW


def test_errors(tiny_llama):
    with pytest.raises(ValueError, match="merge='mean' must be one of"):
        TaskMergeConfig(merge="mean")
    with pytest.raises(ValueError, match="lam=-1 must be a finite number"):
        TaskMergeConfig(lam=-1)
    with pytest.raises(ValueError, match="density=1.5 must be in"):
        TaskMergeConfig(density=1.5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        TaskMergeLoRA(tiny_llama)
    cm = _setup(tiny_llama)
    with pytest.raises(RuntimeError, match="without begin_task"):
        cm.end_task()
    cm.begin_task()
    with pytest.raises(RuntimeError, match="already begun"):
        cm.begin_task()
    name, layer = next(iter(cm.layers.items()))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: the task's adapter has non-finite"):
        cm.end_task()
    assert cm.in_task and cm.task_index == 0
    with pytest.raises(ValueError, match="'preview' must be 'merged' or 'finetuned'"):
        with cm.adapter_mode("preview"):
            pass
    state = cm.state_dict()
    state["tensors"].pop(f"{name}.start_A")
    with pytest.raises(KeyError, match=f"{name}.start_A: missing"):
        cm.load_state_dict(state)


def test_peft_export_refuses_the_dense_merge_and_takes_the_low_rank_one(tiny_llama, tmp_path):
    cm = _setup(tiny_llama)
    mbf.save_peft_adapter(tiny_llama, tmp_path / "before")  # no merge yet: the LoRA alone describes it
    _run_tasks(cm, 1)
    with pytest.raises(ValueError, match=r"a dense merged ΔW \(task-arithmetic / ties\)"):
        mbf.save_peft_adapter(tiny_llama, tmp_path / "dense")
    low = _setup(make_tiny_llama(), low_rank=True)
    _run_tasks(low, 2)
    mbf.save_peft_adapter(low.model, tmp_path / "low", adapter="merged")  # its merged adapter is the merge
    assert (tmp_path / "low" / "adapter_model.safetensors").is_file()
    again = TaskMergeLoRA(tiny_llama)  # a new strategy on the model takes the old one's deltas off
    assert not cm.active() and not again.active()
    mbf.save_peft_adapter(tiny_llama, tmp_path / "after")


def test_another_strategy_on_the_model_takes_the_merged_delta_off(tiny_llama):
    from mbf.strategies.olora import OLoRA

    cm = _setup(tiny_llama, merge="task_arithmetic")
    _run_tasks(cm, 1)
    layer = next(iter(cm.layers.values()))
    x = torch.randn(2, layer.in_features)
    assert cm.active()
    OLoRA(tiny_llama)  # a model runs one strategy's extra terms: the dense ΔW no longer computes
    assert not cm.active()
    with torch.no_grad(), cm.merged():
        torch.testing.assert_close(layer(x), nn_linear(layer, x))  # merged_A/B are zero: the base alone

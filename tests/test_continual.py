"""ContinualLoRA: every SLAO invariant of DESIGN.md, state and persistence."""

import math

import pytest
import torch

import mbf
from mbf import reference


def _setup(model, **kw):
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    return mbf.ContinualLoRA(model, **kw)


def _fake_training(cl, seed):
    """Stand-in for a task's training: move every fine-tuned adapter to fresh random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cl.layers.values():
            layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g))


def _snapshot(cl):
    return {
        n: {k: getattr(layer, k).detach().clone() for k in ("lora_A", "lora_B", "merged_A", "merged_B")}
        for n, layer in cl.layers.items()
    }


def test_slao_invariants_over_four_tasks(tiny_llama):
    cl = _setup(tiny_llama)
    for i in range(1, 5):
        before = _snapshot(cl)
        cl.begin_task()
        after_init = _snapshot(cl)
        for name in cl.layers:
            A_prev, A_new = before[name]["lora_A"], after_init[name]["lora_A"]
            if i == 1:  # the usual LoRA init is left alone
                assert torch.equal(A_new, A_prev)
                continue
            # orthonormal rows ...
            torch.testing.assert_close(A_new @ A_new.T, torch.eye(4), atol=1e-5, rtol=0)
            # ... spanning the previous fine-tuned A's row space, with SLAO's sign convention
            torch.testing.assert_close(
                A_new, reference.orthonormal_rows(A_prev.double()).float(), atol=1e-5, rtol=0
            )
            proj = (A_prev @ A_new.T) @ A_new
            torch.testing.assert_close(proj, A_prev, atol=1e-5, rtol=1e-5)
            # B is carried over from the previous fine-tuned B
            assert torch.equal(after_init[name]["lora_B"], before[name]["lora_B"])
        _fake_training(cl, seed=i)
        ft = _snapshot(cl)
        cl.end_task()
        assert cl.task_index == i
        lam = 1 / math.sqrt(i)
        for name, layer in cl.layers.items():
            prev_m = before[name]["merged_B"].double()
            want = prev_m + lam * (ft[name]["lora_B"].double() - prev_m)
            torch.testing.assert_close(layer.merged_B.double(), want, atol=1e-6, rtol=1e-6)
            assert torch.equal(layer.merged_A, ft[name]["lora_A"])
            if i == 1:  # after task 1, merged == fine-tuned
                assert torch.equal(layer.merged_B, layer.lora_B)


def test_merged_context_switches_the_adapter(tiny_llama):
    cl = _setup(tiny_llama)
    ids = torch.randint(0, 97, (2, 8))
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.begin_task()
    _fake_training(cl, 2)
    tiny_llama.train()  # training computes with the fine-tuned adapter (no dropout here)
    with torch.no_grad():
        ft_out = tiny_llama(ids).logits
        with cl.merged():
            merged_out = tiny_llama(ids).logits
        assert torch.equal(tiny_llama(ids).logits, ft_out)  # restored on exit
    assert not torch.allclose(ft_out, merged_out)
    tiny_llama.eval()
    # the merged adapter alone, computed by hand for one layer
    name, layer = next(iter(cl.layers.items()))
    x = torch.randn(3, layer.in_features)
    with cl.merged():
        got = layer(x)
    want = reference.lora_linear(x, layer.weight, layer.bias, layer.merged_A, layer.merged_B, layer.scaling)
    torch.testing.assert_close(got, want)


def test_preview_equals_the_merge_it_previews(tiny_llama):
    cl = _setup(tiny_llama)
    ids = torch.randint(0, 97, (1, 6))
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.begin_task()
    _fake_training(cl, 2)
    with torch.no_grad(), cl.adapter_mode("preview"):
        preview = tiny_llama(ids).logits
    cl.end_task()
    with torch.no_grad(), cl.merged():
        merged = tiny_llama(ids).logits
    torch.testing.assert_close(preview, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "schedule,lam2", [("sqrt", 2**-0.5), ("inverse", 0.5), ("constant", 0.3), ("none", 1.0)]
)
def test_schedules(tiny_llama, schedule, lam2):
    cl = _setup(tiny_llama, schedule=schedule, constant=0.3)
    assert cl.lam(1) == 1.0  # every schedule, the constant one included: task 1 is merged whole
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    for layer in cl.layers.values():
        assert torch.equal(layer.merged_B, layer.lora_B)  # after task 1, merged == fine-tuned
    m1 = {n: layer.merged_B.clone() for n, layer in cl.layers.items()}
    cl.begin_task()
    _fake_training(cl, 2)
    cl.end_task()
    for n, layer in cl.layers.items():
        torch.testing.assert_close(layer.merged_B, m1[n] + lam2 * (layer.lora_B - m1[n]))


def test_inits(tiny_llama):
    cl = _setup(tiny_llama, init="last_merge")
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.begin_task()
    _fake_training(cl, 2)
    cl.end_task()
    cl.begin_task()
    for layer in cl.layers.values():
        assert torch.equal(layer.lora_B, layer.merged_B)
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)


def test_random_and_none_inits(tiny_llama):
    cl = _setup(tiny_llama, init="random")
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.begin_task()
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in cl.layers.values())
    cl.end_task()
    cl2 = mbf.ContinualLoRA(tiny_llama, init="none", schedule="none")  # sequential LoRA
    cl2.begin_task()
    _fake_training(cl2, 3)
    cl2.end_task()
    before = _snapshot(cl2)
    cl2.begin_task()
    after = _snapshot(cl2)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


def test_state_is_constant_in_the_number_of_tasks(tiny_llama):
    cl = _setup(tiny_llama)
    sizes = []
    for i in range(5):
        cl.begin_task()
        _fake_training(cl, i)
        cl.end_task()
        sizes.append((cl.adapter_bytes(), len(cl.state_dict()["tensors"])))
    assert len(set(sizes)) == 1
    r, layers = 4, cl.layers.values()
    assert sizes[0][0] == sum(2 * 4 * r * (layer.in_features + layer.out_features) for layer in layers)


def test_save_load_round_trip(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    cl = _setup(tiny_llama, schedule="inverse", init="last_merge")
    for i in range(2):
        cl.begin_task()
        _fake_training(cl, i)
        cl.end_task()
    cl.save(tmp_path / "ckpt")
    fresh = make_tiny_llama()  # same base weights, no LoRA yet: load injects the saved config
    cl2 = mbf.ContinualLoRA.load(fresh, tmp_path / "ckpt")
    assert (cl2.task_index, cl2.config.schedule, cl2.config.init) == (2, "inverse", "last_merge")
    a, b = _snapshot(cl), _snapshot(cl2)
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad(), cl.merged(), cl2.merged():
        torch.testing.assert_close(tiny_llama(ids).logits, fresh(ids).logits)
    assert not list(tmp_path.glob("ckpt/.*"))  # no temp files left behind


def test_errors(tiny_llama):
    with pytest.raises(ValueError, match="no LoRA layers"):
        mbf.ContinualLoRA(tiny_llama)
    mbf.inject(tiny_llama, mbf.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        mbf.ContinualLoRA(tiny_llama, schedule="cos")
    with pytest.raises(ValueError, match="unknown init 'zeros'"):
        mbf.ContinualLoRA(tiny_llama, init="zeros")
    cl = mbf.ContinualLoRA(tiny_llama)
    with pytest.raises(RuntimeError, match="end_task\\(\\) without begin_task"):
        cl.end_task()
    cl.begin_task()
    with pytest.raises(RuntimeError, match="task 1 already begun"):
        cl.begin_task()
    name, layer = next(iter(cl.layers.items()))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: fine-tuned adapter has non-finite values"):
        cl.end_task()
    assert cl.task_index == 0


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tiny_llama, tmp_path, monkeypatch):
    from conftest import make_tiny_llama

    import mbf.checkpoint as checkpoint

    cl = _setup(tiny_llama)
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.save(tmp_path / "ckpt")
    saved = _snapshot(cl)
    cl.begin_task()
    _fake_training(cl, 2)
    cl.end_task()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the tensors, before the json is replaced

    monkeypatch.setattr(checkpoint, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        cl.save(tmp_path / "ckpt")
    monkeypatch.undo()
    restored = mbf.ContinualLoRA.load(make_tiny_llama(), tmp_path / "ckpt")
    assert restored.task_index == 1
    got = _snapshot(restored)
    assert all(torch.equal(saved[n][k], got[n][k]) for n in saved for k in saved[n])
    cl.save(tmp_path / "ckpt")  # the next good save cleans up the orphan tensor file
    assert len(list((tmp_path / "ckpt").glob("adapters-*.safetensors"))) == 1


def test_load_refuses_a_checkpoint_of_another_lora_config(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    cl = _setup(tiny_llama)  # r=4, alpha=8
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.save(tmp_path / "ckpt")
    other = mbf.inject(make_tiny_llama(), mbf.LoRAConfig(r=4, alpha=64))
    with pytest.raises(
        ValueError, match=r"saved LoRAConfig.alpha=8 but the model was injected with alpha=64"
    ):
        mbf.ContinualLoRA.load(other, tmp_path / "ckpt")


def test_a_mid_task_checkpoint_resumes_inside_the_task(tiny_llama, tmp_path):
    from conftest import make_tiny_llama

    cl = _setup(tiny_llama)
    for i in (1, 2):
        cl.begin_task()
        _fake_training(cl, i)
        if i == 1:
            cl.end_task()
    cl.save(tmp_path / "mid")  # inside task 2, after some training
    cl2 = mbf.ContinualLoRA.load(make_tiny_llama(), tmp_path / "mid")
    assert cl2.in_task and cl2.task_index == 1
    a = _snapshot(cl2)["model.layers.0.self_attn.q_proj"]["lora_A"]
    cl2.end_task()  # no second QR of the half-trained A: the task simply ends
    assert cl2.task_index == 2
    assert torch.equal(cl2.layers["model.layers.0.self_attn.q_proj"].merged_A, a)


def test_unfold_undoes_fold_even_if_the_mode_changed_in_between(tiny_llama):
    cl = _setup(tiny_llama)
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    cl.begin_task()
    _fake_training(cl, 2)
    layer = next(iter(cl.layers.values()))
    w0 = layer.weight.detach().clone()
    with cl.merged():
        layer.fold()
    layer.unfold()  # now in fine-tuned mode: must still subtract the merged adapter's delta
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)


def test_a_failed_begin_task_can_be_retried(tiny_llama):
    cl = _setup(tiny_llama)
    cl.begin_task()
    _fake_training(cl, 1)
    cl.end_task()
    layer = next(iter(cl.layers.values()))
    good = layer.lora_A.detach().clone()
    with torch.no_grad():
        layer.lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cl.begin_task()
    assert not cl.in_task
    with torch.no_grad():
        layer.lora_A.copy_(good)
    cl.begin_task()
    assert cl.in_task


@pytest.mark.parametrize("merge", ["A", "AB"])
def test_merge_strategy_ablations_merge_the_named_factors(tiny_llama, merge):
    """FTBA-MA: A_m is λ-merged and B_m = B_ft; FTBA-MBA: both λ-merged (λ(2) = 1/√2)."""
    cl = _setup(tiny_llama, init="none", merged_factors=merge)
    ft = []
    for task in range(2):
        cl.begin_task()
        _fake_training(cl, task)
        cl.end_task()
        ft.append(_snapshot(cl))
    lam = 1 / 2**0.5
    for name, layer in cl.layers.items():
        A1, A2 = ft[0][name]["lora_A"], ft[1][name]["lora_A"]
        B1, B2 = ft[0][name]["lora_B"], ft[1][name]["lora_B"]
        torch.testing.assert_close(layer.merged_A, A1 + lam * (A2 - A1))
        torch.testing.assert_close(layer.merged_B, B1 + lam * (B2 - B1) if merge == "AB" else B2)


@pytest.mark.parametrize("train", ["A", "B"])
def test_frozen_factor_ablations(tiny_llama, train):
    """FREB (train A) / FREA (train B): the frozen factor gets no gradient and never changes."""
    cl = _setup(tiny_llama, init="none", train=train, merged_factors=train)
    frozen = "B" if train == "A" else "A"
    cl.begin_task()
    layers = list(cl.layers.values())
    assert all(getattr(layer, f"lora_{frozen}").requires_grad is False for layer in layers)
    assert {id(p) for p in cl.trainable_parameters()} == {
        id(getattr(layer, f"lora_{train}")) for layer in layers
    }
    if frozen == "B":  # B frozen from task 1: it starts random and A at zero, so the adapter can learn
        assert all(layer.lora_B.abs().sum() > 0 and layer.lora_A.abs().sum() == 0 for layer in layers)
    start = [getattr(layer, f"lora_{frozen}").detach().clone() for layer in layers]
    tiny_llama(torch.randint(0, 97, (1, 5))).logits.sum().backward()
    assert all(getattr(layer, f"lora_{frozen}").grad is None for layer in layers)
    cl.end_task()
    cl.begin_task()
    assert all(torch.equal(getattr(layer, f"lora_{frozen}"), s) for layer, s in zip(layers, start))
    with pytest.raises(ValueError, match=r"train='BA' must be one of"):
        mbf.ContinualConfig(train="BA")

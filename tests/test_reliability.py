"""Bad input, half-done operations, damaged checkpoints: every failure is loud, named, changes nothing."""

import json
import os
import stat

import pytest
import torch
from conftest import assert_close, make_tiny_llama, slao_tasks
from torch import nn

import mbf
from mbf.io import atomic_write_text


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_slao = slao_tasks


# -- LoRALinear -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [float("nan"), 0.0, float("inf"), -1.0, True])
def test_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(ValueError, match=rf"q_proj: alpha={alpha!r} must be a finite number > 0"):
        mbf.LoRALinear.from_linear(nn.Linear(16, 8), r=2, alpha=alpha, name="q_proj")


def test_misspelt_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"v_proj: backend='trition' must be one of"):
        mbf.LoRALinear.from_linear(nn.Linear(16, 8), r=2, backend="trition", name="v_proj")


def test_input_errors_name_the_layer():
    layer = mbf.LoRALinear.from_linear(nn.Linear(16, 8), r=2, name="model.layers.3.self_attn.q_proj")
    with pytest.raises(
        TypeError, match=r"layers\.3\.self_attn\.q_proj: input dtype torch\.float16 but the base"
    ):
        layer(torch.randn(2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"layers\.3\.self_attn\.q_proj: input has 15 features, expected 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="is not floating point"):
        layer(torch.ones(2, 16, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's job there
        assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 8)


# -- eject ------------------------------------------------------------------------------------------


def test_eject_folds_the_adapter_inference_uses():
    """After SLAO tasks, eject(fold=True) gives the model cl.merged() computes, not the fine-tuned one."""
    ids = torch.randint(0, 97, (2, 7))
    model = make_tiny_llama()
    cl = _slao(model)
    with torch.no_grad():
        cl.begin_task()  # a third task in progress: the fine-tuned adapter differs from the merged one
        for layer in cl.layers.values():
            layer.lora_B.add_(1.0)
        with cl.merged():
            want = model(ids).logits
        with cl.adapter_mode("finetuned"):
            finetuned = model(ids).logits
    assert not torch.allclose(want, finetuned)
    mbf.eject(model, fold=True)
    with torch.no_grad():
        assert_close(model(ids).logits, want, torch.float32)
    assert not mbf.lora_layers(model)


def test_eject_folds_the_named_adapter_and_the_finetuned_one_before_any_merge():
    ids = torch.randint(0, 97, (2, 7))
    model = make_tiny_llama()
    cl = _slao(model, tasks=1)
    cl.begin_task()
    with torch.no_grad():
        for layer in cl.layers.values():
            layer.lora_B.add_(1.0)
        with cl.adapter_mode("finetuned"):
            want = model(ids).logits
    mbf.eject(model, fold=True, adapter="finetuned")
    with torch.no_grad():
        assert_close(model(ids).logits, want, torch.float32)

    plain = make_tiny_llama()  # plain LoRA, no task ever merged: "auto" is the fine-tuned adapter
    mbf.inject(plain, mbf.LoRAConfig(r=4, target_modules=("q_proj",)))
    with torch.no_grad():
        for layer in mbf.lora_layers(plain).values():
            layer.lora_B.normal_()
        want = plain(ids).logits
    mbf.eject(plain, fold=True)
    with torch.no_grad():
        assert_close(plain(ids).logits, want, torch.float32)
    with pytest.raises(ValueError, match="adapter='last' must be"):
        mbf.eject(make_tiny_llama(), fold=True, adapter="last")


def test_eject_with_a_non_finite_layer_changes_nothing():
    model = make_tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cl = _slao(model, tasks=1)
    bad = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        cl.layers[bad].merged_B[0, 0] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{bad}: folding would produce non-finite weights"):
        mbf.eject(model, fold=True)
    assert _same(before, _snapshot(model))  # no layer folded
    assert set(mbf.lora_layers(model)) == set(cl.layers)  # still injected, config kept
    assert model.mbf_lora_config.r == 4
    mbf.eject(model)  # without folding it gives the model back
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# -- the merge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", [float("nan"), 5.0, -3.0, 0.0, float("inf")])
def test_lambda_outside_zero_one_is_refused(constant):
    with pytest.raises(ValueError, match=r"constant λ=.* must be in \(0, 1\]"):
        mbf.ContinualConfig(schedule="constant", constant=constant)
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=2, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        mbf.ContinualLoRA(model, schedule="constant", constant=constant)


def test_a_non_finite_merge_result_is_not_committed():
    """Finite adapters whose merge overflows fp32: end_task raises and leaves the merged state alone."""
    model = make_tiny_llama()
    cl = _slao(model, tasks=1)
    before = _snapshot(model)
    cl.begin_task()
    layer = cl.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.merged_B.fill_(-3e38)
        layer.lora_B.fill_(3e38)  # B_ft − B_m overflows
    merged_before = layer.merged_B.clone()
    with pytest.raises(ValueError, match=r"self_attn\.q_proj: merge with λ=0\.707107 has non-finite values"):
        cl.end_task()
    assert torch.equal(layer.merged_B, merged_before) and cl.task_index == 1 and cl.in_task
    other = "model.layers.1.self_attn.v_proj"
    assert torch.equal(cl.layers[other].merged_B, before[f"{other}.merged_B"])


# -- checkpoints ------------------------------------------------------------------------------------


def test_load_into_another_model_changes_nothing(tmp_path):
    cl = _slao(make_tiny_llama(num_hidden_layers=3))
    cl.save(tmp_path / "three")
    two = make_tiny_llama()
    live = _slao(two, seed=1)
    before = _snapshot(two)
    with pytest.raises(
        KeyError, match=r"model\.layers\.2\.self_attn\.q_proj\.lora_A: in the saved state but not"
    ):
        mbf.ContinualLoRA.load(two, tmp_path / "three")
    assert _same(before, _snapshot(two)) and live.task_index == 2

    wider_v = make_tiny_llama(num_key_value_heads=4)  # v_proj 48 -> 48 instead of 48 -> 24
    _slao(wider_v, tasks=1)
    before = _snapshot(wider_v)
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.v_proj\.lora_B: saved shape \(24, 4\) != \(48, 4\)"
    ):
        mbf.ContinualLoRA.load(wider_v, _slao(make_tiny_llama(), tasks=1).save(tmp_path / "two"))
    assert _same(before, _snapshot(wider_v))  # q_proj of layer 0 came first and was not copied either


def test_a_failed_load_leaves_a_fresh_model_uninjected(tmp_path):
    cl = _slao(make_tiny_llama())
    cl.save(tmp_path / "ckpt")
    other = make_tiny_llama(hidden_size=64, intermediate_size=128)  # other shapes: load injects, then fails
    with pytest.raises(ValueError, match="saved shape"):
        mbf.ContinualLoRA.load(other, tmp_path / "ckpt")
    assert not mbf.lora_layers(other) and not hasattr(other, "mbf_lora_config")
    assert all(p.requires_grad for p in other.parameters())


def test_flipped_bytes_are_caught(tmp_path):
    cl = _slao(make_tiny_llama())
    path = cl.save(tmp_path / "ckpt")
    file = next(path.glob("adapters-*.safetensors"))
    data = bytearray(file.read_bytes())
    data[-7] ^= 0x10  # a bit of the last tensor's payload: still a valid safetensors file
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{file.name}: SHA-256 differs .* modified or corrupted"):
        mbf.ContinualLoRA.load(make_tiny_llama(), path)


def test_a_flipped_byte_past_the_first_mib_is_caught(tmp_path):
    """The checksum covers the whole tensor file, not its first MiB (it is read in 1 MiB chunks): a
    1.6 MB checkpoint with one bit flipped 300 kB past the first MiB, a valid safetensors file still."""
    from mbf.checkpoint import Checkpoint, read_checkpoint, write_checkpoint

    A = torch.randn(8, 50_000)
    tensors = {"layers.0.q_proj.lora_A": A, "layers.0.q_proj.lora_B": torch.randn(4, 8)}
    path = write_checkpoint(tmp_path / "ckpt", Checkpoint(0, False, mbf.ContinualConfig(), None, tensors))
    assert torch.equal(read_checkpoint(path).tensors["layers.0.q_proj.lora_A"], A)  # intact: it loads
    file = next(path.glob("adapters-*.safetensors"))
    data = bytearray(file.read_bytes())
    assert len(data) > (1 << 20) + 300_000
    data[(1 << 20) + 300_000] ^= 0x01  # the lowest bit of one byte of lora_A (1.6 MB of payload)
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{file.name}: SHA-256 differs .* modified or corrupted"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("task_index", -2, r"task_index=-2 must be an integer >= 0"),
        ("task_index", "abc", r"task_index='abc' must be an integer >= 0"),
        ("in_task", "yes", r"in_task='yes' must be true or false"),
        ("config", {"schedule": "sqrt", "lr": 3}, r"ContinualConfig: unknown field\(s\) lr"),
        ("config", {"schedule": "cosine"}, r"unknown schedule 'cosine'"),
        ("tensors_file", "../../etc/passwd", r"tensors_file='\.\./\.\./etc/passwd' is not"),
        ("lora_config", {"r": 0}, r"rank 0 must be an integer"),
    ],
)
def test_hand_edited_metadata_is_validated(tmp_path, field, value, match):
    cl = _slao(make_tiny_llama())
    path = cl.save(tmp_path / "ckpt")
    meta = json.loads((path / "continual.json").read_text())
    meta[field] = value
    (path / "continual.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        mbf.ContinualLoRA.load(make_tiny_llama(), path)


def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text("x", tmp_path / "results.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_inject_keeps_the_model_in_its_mode():
    """An eval() model stays in eval after inject: LoRA dropout must not switch on by itself."""
    model = make_tiny_llama()  # eval()
    mbf.inject(model, mbf.LoRAConfig(r=2, dropout=0.5, target_modules=("q_proj",)))
    assert not any(layer.training for layer in mbf.lora_layers(model).values())
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # no random mask in eval

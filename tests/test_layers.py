"""LoRALinear: drop-in behaviour, folding (PEFT's merge/unmerge), validation."""

import pytest
import torch
from conftest import assert_close
from torch import nn

import mbf
from mbf import reference


def _layer(in_f=24, out_f=17, r=4, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = mbf.LoRALinear.from_linear(lin, r=r, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every adapter bug
        layer.merged_A.normal_()
        layer.merged_B.normal_()
    return lin, layer


def test_starts_as_the_base_layer():
    lin = nn.Linear(24, 17)
    layer = mbf.LoRALinear.from_linear(lin, r=4, alpha=8)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.scaling == 2.0 and layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (17, 4)
    assert not lin.weight.requires_grad and layer.lora_A.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_reference(bias):
    lin, layer = _layer(bias=bias)
    x = torch.randn(2, 7, 24, requires_grad=True)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, 7, 17)
    dY = torch.randn_like(y)
    y.backward(dY)
    d = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    x64, A64, B64 = d(x), d(layer.lora_A), d(layer.lora_B)
    b64 = None if lin.bias is None else lin.bias.double()
    ref = reference.lora_linear(x64, lin.weight.double(), b64, A64, B64, layer.scaling)
    ref.backward(dY.double())
    for got, want in [
        (y, ref),
        (x.grad, x64.grad),
        (layer.lora_A.grad, A64.grad),
        (layer.lora_B.grad, B64.grad),
    ]:
        assert_close(got, want, torch.float32)
    assert lin.weight.grad is None


def test_merged_and_preview_modes():
    lin, layer = _layer()
    x = torch.randn(5, 24, dtype=torch.float64)
    W = lin.weight.double()
    layer.adapter_mode = "merged"
    want = reference.lora_linear(
        x, W, lin.bias.double(), layer.merged_A.double(), layer.merged_B.double(), 2.0
    )
    assert_close(layer(x.float()), want, torch.float32)
    layer.adapter_mode, layer.lam = "preview", 0.3
    want = reference.lora_linear(
        x,
        W,
        lin.bias.double(),
        layer.lora_A.double(),
        layer.lora_B.double(),
        2.0,
        merged_B=layer.merged_B.double(),
        lam=0.3,
    )
    assert_close(layer(x.float()), want, torch.float32)
    layer.adapter_mode = "bogus"
    with pytest.raises(ValueError, match="adapter_mode 'bogus' must be one of"):
        layer(x.float())


def test_fold_unfold_round_trip_and_delta_weight():
    lin, layer = _layer()
    x = torch.randn(4, 24)
    before, w0 = layer(x), lin.weight.detach().clone()
    torch.testing.assert_close(layer.get_delta_weight(), layer.scaling * layer.lora_B @ layer.lora_A)
    layer.fold()
    assert layer.folded
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin(x), before, atol=1e-5, rtol=1e-5)
    layer.unfold()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)


def test_merge_and_unmerge_are_deprecated_names_of_fold_and_unfold():
    """PEFT's ``merge(safe_merge, adapter)`` / ``unmerge()`` still fold and unfold, with a warning naming
    the new method ("merge" is SLAO's merge of adapters)."""
    lin, layer = _layer()
    x, w0 = torch.randn(4, 24), lin.weight.detach().clone()
    before = layer(x)
    with pytest.warns(DeprecationWarning, match=r"merge\(\) is deprecated: use fold\(\)"):
        layer.merge(False, adapter="finetuned")
    assert layer.folded_adapter == "finetuned"
    torch.testing.assert_close(lin(x), before, atol=1e-5, rtol=1e-5)
    with pytest.warns(DeprecationWarning, match=r"unmerge\(\) is deprecated: use unfold\(\)"):
        layer.unmerge()
    assert not layer.folded
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite():
    lin, layer = _layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="LoRALinear: folding would produce non-finite weights"):
        layer.fold()
    assert torch.equal(lin.weight, w0) and not layer.folded


def test_dropout_only_in_training():
    lin = nn.Linear(24, 17)
    layer = mbf.LoRALinear.from_linear(lin, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 24)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.manual_seed(2)
    c = layer(x)
    torch.testing.assert_close(a, b)  # the mask's seed comes from torch's generator
    assert not torch.allclose(a, c)
    layer.eval()
    no_drop = reference.lora_linear(x, lin.weight, lin.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), no_drop)


def test_validation_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"q_proj: rank 0 must be an integer in \[1, 17\]"):
        mbf.LoRALinear(nn.Linear(24, 17), r=0, name="q_proj")
    with pytest.raises(ValueError, match=r"v_proj: rank 18 must be an integer in \[1, 17\]"):
        mbf.LoRALinear(nn.Linear(24, 17), r=18, name="v_proj")
    with pytest.raises(ValueError, match=r"k_proj: dropout 1.5 must be in \[0, 1\)"):
        mbf.LoRALinear(nn.Linear(24, 17), r=2, dropout=1.5, name="k_proj")
    with pytest.raises(TypeError, match="o_proj: expected nn.Linear, got Conv1d"):
        mbf.LoRALinear(nn.Conv1d(2, 2, 1), r=2, name="o_proj")


def test_extra_repr_and_bf16_output_dtype():
    lin = nn.Linear(24, 17, dtype=torch.bfloat16)
    layer = mbf.LoRALinear.from_linear(lin, r=4, alpha=8)
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer)
    assert layer(torch.randn(3, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_same_outputs_and_grads_as_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = nn.Linear(24, 17)
    peft_model = get_peft_model(
        nn.Sequential(nn.Linear(24, 17)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    )
    peft_layer = peft_model.base_model.model[0]
    peft_layer.base_layer.load_state_dict(base.state_dict())
    ours = mbf.LoRALinear.from_linear(base, r=4, alpha=8)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x1 = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = peft_model(x1), ours(x2)
    dY = torch.randn_like(y1)
    y1.backward(dY)
    y2.backward(dY)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


def test_fp32_adapters_over_a_bf16_base_keep_fp32_gradients():
    lin = nn.Linear(40, 24, dtype=torch.bfloat16)
    layer = mbf.LoRALinear.from_linear(lin, r=4, alpha=8, backend="torch")
    assert layer.lora_A.dtype == torch.float32 and layer.merged_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(9, 40).to(torch.bfloat16)
    dY = torch.randn(9, 24).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(dY)
    d = lambda t: t.detach().double().requires_grad_(True)  # noqa: E731
    A64, B64 = d(layer.lora_A), d(layer.lora_B)
    ref = reference.lora_linear(x.double(), lin.weight.double(), lin.bias.double(), A64, B64, layer.scaling)
    ref.backward(dY.double())
    assert_close(y, ref, torch.bfloat16)
    # the branch ran in fp32: the adapter gradients are fp32-accurate, not bf16-accurate
    assert_close(layer.lora_A.grad, A64.grad, torch.float32)
    assert_close(layer.lora_B.grad, B64.grad, torch.float32)

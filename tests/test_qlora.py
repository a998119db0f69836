"""QLoRA end to end: LoRALinear over an NF4 base against bitsandbytes + PEFT, inject, merge, SLAO."""

import math

import pytest
import torch
from conftest import assert_close, make_tiny_llama
from torch import nn

import mbf
from mbf import functional, nf4, reference
from mbf.nn import NF4Linear


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        pytest.skip("bitsandbytes is not installed (pip install mbf-lora[qlora]): nothing to compare with")
    return bitsandbytes


def _bnb_linear4bit(dense: nn.Linear, compute_dtype: torch.dtype, quant_type: str = "nf4"):
    _bnb()  # skips the test without bitsandbytes
    return nf4.make_linear4bit(dense, compute_dtype, quant_type=quant_type, device="cpu")


def _bnb_dequantized_fp32(layer) -> torch.Tensor:
    """The ``Linear4bit``'s weight as bitsandbytes dequantises it, in fp32 (the exact NF4 values)."""
    import copy

    from bitsandbytes.functional import dequantize_4bit

    state = copy.copy(layer.weight.quant_state)
    state.dtype = torch.float32
    return dequantize_4bit(layer.weight.data, state)


def _run(module, x, dy, A, B):
    """(y, dx, dA, dB) of one forward/backward."""
    xx = x.clone().requires_grad_()
    y = module(xx)
    y.backward(dy)
    out = (y.detach(), xx.grad, A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_bnb_linear4bit_with_peft(dtype):
    """Same NF4 weight, same adapter: output and gradients of x, A, B against the float64 spec (over
    the dequantised weight), each held to bitsandbytes + PEFT's own error against it.

    PEFT keeps QLoRA adapters in fp32 and runs the LoRA branch in fp32, mbf in the activation dtype,
    so in bf16 only y and dx (where the 4-bit base enters) are held to PEFT's error; dA and dB are
    held to the bf16 row of the tolerance table.
    """
    from peft import LoraConfig, get_peft_model

    lin = _bnb_linear4bit(nn.Linear(192, 67), dtype)  # N odd, K = 3 blocks
    wrapper = nn.Sequential()
    wrapper.add_module("proj", lin)
    wrapper.is_loaded_in_4bit = True  # what PEFT reads to pick its bitsandbytes Linear4bit layer
    peft_model = get_peft_model(wrapper, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    peft_layer = peft_model.base_model.model.proj
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"
    pA, pB = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    with torch.no_grad():
        pB.normal_(0, 0.1)  # a non-zero B: the LoRA term and dA matter
    ours = mbf.LoRALinear(lin, r=4, alpha=8, backend="torch", name="proj")
    assert ours.is_4bit and ours.base.weight_packed.data_ptr() == lin.weight.data_ptr()  # zero-copy
    with torch.no_grad():
        ours.lora_A.copy_(pA)
        ours.lora_B.copy_(pB)

    x, dy = torch.randn(3, 11, 192).to(dtype), torch.randn(3, 11, 67).to(dtype)
    theirs = _run(peft_model, x, dy, pA, pB)
    mine = _run(ours, x, dy, ours.lora_A, ours.lora_B)

    leaves = [t.detach().double().requires_grad_() for t in (x, ours.lora_A, ours.lora_B)]
    # the spec's weight is bitsandbytes' own fp32 dequantisation, never mbf's: measured against mbf's,
    # a wrong mbf dequantisation would move the reference along with mbf's output
    W64 = _bnb_dequantized_fp32(lin).double()
    ref = reference.lora_linear(leaves[0], W64, lin.bias.double(), leaves[1], leaves[2], ours.scaling)
    ref.backward(dy.double())
    refs = (ref.detach(), *(t.grad for t in leaves))
    # in fp32 both compute the same sums in another order, so rounding luck alone separates their errors
    # (a 2-core Xeon with AMX: 7.309e-06 against bitsandbytes' 7.307e-06 on y): within 10 %; a wrong
    # code, scale or layout is off by orders of magnitude. In bf16 mbf's error must not exceed theirs.
    slack = 1.1 if dtype == torch.float32 else 1.0
    for name, got, bnb_got, want in zip(("y", "dx", "dA", "dB"), mine, theirs, refs):
        assert got.shape == want.shape, name
        # the root-sum-square error: one element's rounding luck does not decide it
        err, bnb_err = (got.double() - want).norm(), (bnb_got.double() - want).norm()
        if dtype == torch.float32 or name in ("y", "dx"):
            assert err <= slack * bnb_err, (
                f"{name}: mbf error {err:.3g} > {slack} x bitsandbytes + PEFT error {bnb_err:.3g}"
            )
        else:
            assert_close(got, want, dtype)


def test_triton_paths_match_torch_path_in_the_layer():
    """LoRALinear over NF4 with backend='triton' (interpreter on CPU) against its torch path."""
    pytest.importorskip("mbf.kernels.nf4", reason="triton is not installed", exc_type=ImportError)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = NF4Linear.from_linear(nn.Linear(128, 40, device=device))
    layers = {b: mbf.LoRALinear(base, r=3, alpha=6, backend=b, name="up_proj") for b in ("torch", "triton")}
    with torch.no_grad():
        layers["torch"].lora_B.normal_()
        layers["triton"].load_state_dict(layers["torch"].state_dict())
    x, dy = torch.randn(2, 5, 128, device=device), torch.randn(2, 5, 40, device=device)
    want = _run(layers["torch"], x, dy, layers["torch"].lora_A, layers["torch"].lora_B)
    got = _run(layers["triton"], x, dy, layers["triton"].lora_A, layers["triton"].lora_B)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_functional_float64_path_is_the_spec():
    """With a float64 compute dtype the torch path equals the reference to rounding, every gradient."""
    w = nf4.quantize_nf4(torch.randn(33, 128, dtype=torch.float64))
    x = torch.randn(7, 128, dtype=torch.float64, requires_grad=True)
    A = torch.randn(5, 128, dtype=torch.float64, requires_grad=True)
    B = torch.randn(33, 5, dtype=torch.float64, requires_grad=True)
    Bm, b = torch.randn(33, 5, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    y = functional.lora_linear_nf4(x, w, b, A, B, 1.5, Bm, 0.4, dropout=0.3, seed=11)
    ref = reference.lora_linear(
        x, nf4.dequantize_nf4(w), b, A, B, 1.5, Bm, 0.4, dropout=0.3, seed=11
    )  # the Philox mask of seed 11 on every path
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, (x, A, B), dy), torch.autograd.grad(ref, (x, A, B), dy)):
        assert_close(g, r, torch.float64)
    assert_close(y, ref, torch.float64)
    with pytest.raises(ValueError, match=r"A has shape \(5, 64\), expected \(5, 128\)"):
        functional.lora_linear_nf4(x, w, b, torch.randn(5, 64, dtype=torch.float64), B, 1.0)


def test_merge_gives_a_16bit_copy_and_never_requantises():
    base = NF4Linear.from_linear(nn.Linear(128, 24, dtype=torch.bfloat16))
    packed = base.weight_packed.clone()
    layer = mbf.LoRALinear(base, r=4, alpha=8, name="o_proj")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    before = layer(x)
    layer.fold()
    assert isinstance(layer.base, nn.Linear) and layer.base.weight.dtype == torch.bfloat16
    assert not layer.is_4bit and "weight_packed" not in dict(layer.named_buffers())
    expected = (base.dequantize(torch.float32) + layer._delta_fp32()).to(torch.bfloat16)
    assert torch.equal(layer.base.weight, expected)
    assert_close(layer(x), before, torch.bfloat16)
    layer.unfold()
    assert layer.base is base and torch.equal(base.weight_packed, packed)  # the 4 bits untouched
    assert torch.equal(layer(x), before)


def test_inject_converts_bnb_linear4bit_and_eject_restores_it():
    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    for i, block in enumerate(model.model.layers):
        block.self_attn.q_proj = _bnb_linear4bit(block.self_attn.q_proj, torch.float32)
    originals = [block.self_attn.q_proj for block in model.model.layers]
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    layers = mbf.lora_layers(model)
    assert [layers[f"model.layers.{i}.self_attn.q_proj"].is_4bit for i in range(2)] == [True, True]
    assert not layers["model.layers.0.self_attn.v_proj"].is_4bit  # dense stays dense without quantize
    model(torch.randint(0, 97, (1, 9)))
    mbf.eject(model)
    assert [block.self_attn.q_proj for block in model.model.layers] == originals


def test_inject_rejects_fp4_naming_the_layer():
    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    model.model.layers[1].self_attn.v_proj = _bnb_linear4bit(
        model.model.layers[1].self_attn.v_proj, torch.float32, "fp4"
    )
    with pytest.raises(
        ValueError, match="model.layers.1.self_attn.v_proj: 4-bit quant_type 'fp4' is not supported"
    ):
        mbf.inject(model, mbf.LoRAConfig(r=4, target_modules=("v_proj",)))
    assert not mbf.lora_layers(model)  # nothing swapped


def _train(model, params, ids, steps=8, lr=0.05):
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_tiny_llama_two_tasks_under_continual_lora(tmp_path):
    """quantize='nf4' on every linear of a tiny Llama, two SLAO tasks: the 4-bit base never moves,
    each task's loss falls, the merge follows λ(i) = 1/√i, and the merged export is 16-bit."""
    model = make_tiny_llama(hidden_size=64, intermediate_size=128).train()
    mbf.inject(
        model, mbf.LoRAConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4", backend="torch")
    )
    layers = mbf.lora_layers(model)
    assert len(layers) == 14 and all(layer.is_4bit for layer in layers.values())
    for layer in layers.values():  # 4 bits + an 8-bit absmax per 64 + an fp32 per 256 blocks, + tables
        n = layer.in_features * layer.out_features
        tables = 4 + 256 * 4 + 16 * 4  # offset, dynamic map, NF4 code: fixed per layer
        assert layer.base.nf4.nbytes() - tables == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256)
    packed = {n: layer.base.weight_packed.clone() for n, layer in layers.items()}

    cl = mbf.ContinualLoRA(model, backend="torch")
    params = cl.trainable_parameters()
    assert all(p.dtype.is_floating_point for p in params) and len(params) == 28
    g = torch.Generator().manual_seed(1)
    tasks = [torch.randint(0, 97, (2, 12), generator=g) for _ in range(2)]
    merged_before = None
    for i, ids in enumerate(tasks, start=1):
        cl.begin_task()
        losses = _train(model, params, ids)
        assert losses[-1] < losses[0], f"task {i}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        ft_B = {n: layer.lora_B.detach().clone() for n, layer in layers.items()}
        cl.end_task()
        for n, layer in layers.items():
            prev = torch.zeros_like(ft_B[n]) if merged_before is None else merged_before[n]
            want = prev.double() + (1 / math.sqrt(i)) * (ft_B[n].double() - prev.double())
            assert_close(layer.merged_B, want, torch.float32)
        merged_before = {n: layer.merged_B.detach().clone() for n, layer in layers.items()}
    for n, layer in layers.items():
        assert torch.equal(layer.base.weight_packed, packed[n]), f"{n}: the 4-bit base changed"

    model.eval()
    probe = torch.randint(0, 97, (1, 10), generator=g)
    with torch.no_grad(), cl.merged():
        merged_logits = model(probe).logits
    cl.save(tmp_path / "run")  # and back: load re-injects LoRAConfig(quantize="nf4") into a fresh model
    fresh = make_tiny_llama(hidden_size=64, intermediate_size=128)
    cl2 = mbf.ContinualLoRA.load(fresh, tmp_path / "run")
    assert cl2.task_index == 2 and all(layer.is_4bit for layer in mbf.lora_layers(fresh).values())
    with torch.no_grad(), cl2.merged():
        assert_close(fresh(probe).logits, merged_logits, torch.float32)
    for layer in layers.values():
        layer.adapter_mode = "merged"  # export what inference uses
    mbf.eject(model, fold=True)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, NF4Linear))]
    assert not any(isinstance(m, NF4Linear) for m in linears)  # a 16-bit export, nothing 4-bit
    with torch.no_grad():
        assert_close(model(probe).logits, merged_logits, torch.float32)

"""The base model's dtype: the ``auto`` choice from the hardware probe, bad input, fp32 adapters and
optimizer state over a 16-bit base, checkpoints across dtypes, and QLoRA with a 16-bit compute dtype."""

import warnings

import pytest
import torch
from conftest import assert_close, make_tiny_llama
from fixtures.tiny import tiny_llama

import mbf
from mbf.experiment import models
from mbf.inject import lora_layers

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
X86_NONE = {"architecture": "x86_64", "avx2": True, "avx512_f": True}  # AVX-512 without its bf16/fp16 parts


def _capabilities(monkeypatch, **flags):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**X86_NONE, **flags})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)


@pytest.mark.parametrize(
    "flags, fast",
    [
        ({}, {FP32}),
        ({"avx512_bf16": True}, {FP32, BF16}),
        ({"amx_bf16": True, "amx_tile": True}, {FP32, BF16}),
        ({"avx512_fp16": True}, {FP32, FP16}),
        ({"amx_bf16": True, "amx_fp16": True}, {FP32, BF16, FP16}),
    ],
)
def test_the_probe_reads_torchs_cpu_capabilities(monkeypatch, flags, fast):
    _capabilities(monkeypatch, **flags)
    assert models.cpu_fast_dtypes() == fast
    assert models.auto_dtype("cpu") == (BF16 if BF16 in fast else FP32)


def test_auto_is_float32_without_onednn(monkeypatch):
    _capabilities(monkeypatch, avx512_bf16=True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # no 16-bit CPU GEMMs
    assert models.cpu_fast_dtypes() == {FP32} and models.auto_dtype("cpu") == FP32


@pytest.mark.parametrize("native, expected", [(True, BF16), (False, FP32)])
def test_auto_on_cuda_follows_native_bf16(monkeypatch, native, expected):
    seen = {}

    def is_bf16_supported(including_emulation=True):
        seen["emulation"] = including_emulation
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert models.auto_dtype("cuda") == expected and seen == {"emulation": False}


def test_resolve_dtype_accepts_names_and_torch_dtypes_only(monkeypatch):
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({FP32, BF16}))
    assert models.resolve_dtype("auto") == BF16
    assert [models.resolve_dtype(n) for n in ("float32", "bfloat16", "float16")] == [FP32, BF16, FP16]
    assert models.resolve_dtype(torch.bfloat16) == BF16
    for bad in ("bf16", "float64", torch.int8, None):
        with pytest.raises(ValueError, match=r"dtype .* must be one of auto, float32, bfloat16, float16"):
            models.resolve_dtype(bad)


def test_a_slow_16_bit_dtype_gets_a_message_naming_the_cost(monkeypatch):
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({FP32, BF16}))
    msg = models.slow_dtype_message(FP16, "cpu")
    assert "float16" in msg and "AVX-512-FP16" in msg and "slower than float32" in msg
    assert models.slow_dtype_message(BF16, "cpu") is None and models.slow_dtype_message(FP32, "cpu") is None
    assert models.slow_dtype_message(FP16, "cuda") is None


def test_load_model_takes_the_dtype_and_warns_when_it_is_slow(monkeypatch, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    make_tiny_llama().save_pretrained(tmp_path)
    tok = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(tmp_path)
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({FP32}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 and auto (here fp32): no warning at all
        assert models.load_model(tmp_path, dtype="auto")[0].dtype == FP32
        assert models.load_model(tmp_path, dtype=FP32)[0].dtype == FP32
    with pytest.warns(models.SlowDtypeWarning, match="float16 on a CPU without AMX-FP16"):
        model, tok = models.load_model(tmp_path, dtype="float16")
    assert model.dtype == FP16 and tok.pad_token is not None
    with pytest.raises(ValueError, match="dtype 'half'"):
        models.load_model(tmp_path, dtype="half")


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_adapters_gradients_and_optimizer_state_stay_fp32_over_a_16_bit_base(dtype):
    model = make_tiny_llama().to(dtype)
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model)
    ids = torch.randint(2, 90, (2, 9))
    model.train()  # eval() computes with the merged adapter once a task is merged: it would train nothing
    for _ in range(2):  # two tasks: the QR init and the merge run on the 16-bit model too
        cl.begin_task()
        opt = torch.optim.AdamW(cl.trainable_parameters(), lr=1e-2)
        for _ in range(2):
            logits = model(input_ids=ids).logits
            assert logits.dtype == dtype
            logits.float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        states = [t for s in opt.state.values() for t in s.values() if t.is_floating_point() and t.dim()]
        assert len(states) == 2 * len(cl.trainable_parameters())  # exp_avg, exp_avg_sq of each
        assert all(t.dtype == FP32 for t in states)
        cl.end_task()
    for layer in cl.layers.values():
        assert layer.base.weight.dtype == dtype
        assert {getattr(layer, k).dtype for k in ("lora_A", "lora_B", "merged_A", "merged_B")} == {FP32}
        assert layer.merged_B.abs().sum() > 0  # trained and merged, not the zero init


def _trained(model, seed=1):
    """``model`` with two SLAO tasks' worth of random adapters; the ContinualLoRA."""
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        cl.begin_task()
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
        cl.end_task()
    return cl


def test_a_checkpoint_saved_in_one_dtype_loads_in_another(tmp_path):
    ids = torch.randint(2, 90, (3, 11))
    # weights of std 0.1, not the fixture's 0.3: those amplify bf16's rounding through the layers to ~5%
    # of the logits' scale (the base model's property, not the checkpoint's); here it is ~1%
    tiny = {"initializer_range": 0.1}
    fp32 = make_tiny_llama(**tiny)
    cl = _trained(fp32)
    cl.save(tmp_path / "fp32")
    with torch.no_grad(), cl.merged():
        want = fp32(input_ids=ids).logits

    bf16 = make_tiny_llama(**tiny).to(BF16)  # the same base weights, in bf16
    cl16 = mbf.ContinualLoRA.load(bf16, tmp_path / "fp32")
    assert cl16.task_index == 2
    for name, layer in cl16.layers.items():  # fp32 adapters: loaded bit for bit
        assert layer.merged_B.dtype == FP32 and torch.equal(layer.merged_B, cl.layers[name].merged_B)
    with torch.no_grad(), cl16.merged():
        got = bf16(input_ids=ids).logits
    assert got.dtype == BF16
    assert_close(got, want, BF16)
    assert (got.float() - want).abs().max() > 0  # the bf16 base moved them, within bf16's tolerance
    with torch.no_grad():  # while the adapter moves them far beyond it: the comparison can fail
        bare = make_tiny_llama(**tiny)(input_ids=ids).logits
    assert (bare - want).abs().max() > 10 * 2e-2 * want.abs().max()

    cl16.save(tmp_path / "bf16")  # and back into a float32 model: the very logits of the first
    back = mbf.ContinualLoRA.load(make_tiny_llama(**tiny), tmp_path / "bf16")
    with torch.no_grad(), back.merged():
        torch.testing.assert_close(back.model(input_ids=ids).logits, want, atol=0, rtol=0)


def test_qlora_base_computes_in_the_chosen_16_bit_dtype():
    """The same NF4 codes computed in bf16 and in fp32: the bf16 model is the fp32 one within bf16's
    tolerance, its adapters and their gradients fp32."""
    from mbf.nn import NF4Linear

    tiny = {"initializer_range": 0.1}  # see test_a_checkpoint_saved_in_one_dtype_loads_in_another
    lora = mbf.LoRAConfig(r=4, alpha=8, quantize="nf4")
    models_ = {dt: tiny_llama(**tiny).to(BF16).to(dt) for dt in (FP32, BF16)}  # bf16-exact weights
    for model in models_.values():
        models.quantize_base(model, lora)
        torch.manual_seed(3)  # the same A (inject draws it) and B in both models
        mbf.inject(model, lora)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B)  # the adapter takes part in the comparison
    nf4 = {dt: [m for m in model.modules() if isinstance(m, NF4Linear)] for dt, model in models_.items()}
    assert len(nf4[BF16]) == 2 * 7 and {m.compute_dtype for m in nf4[BF16]} == {BF16}
    for a, b in zip(nf4[FP32], nf4[BF16]):  # one 4-bit storage, two compute dtypes
        assert torch.equal(a.nf4.packed, b.nf4.packed)
    ids = torch.randint(2, 90, (2, 9))
    logits = {dt: model(input_ids=ids).logits for dt, model in models_.items()}
    assert logits[BF16].dtype == BF16
    assert_close(logits[BF16], logits[FP32], BF16)
    logits[BF16].float().logsumexp(-1).mean().backward()
    trainable = [p for p in models_[BF16].parameters() if p.requires_grad]
    assert trainable and all(p.dtype == FP32 and p.grad.dtype == FP32 for p in trainable)
    assert all(p.grad.abs().sum() > 0 for p in trainable)

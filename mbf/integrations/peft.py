"""PEFT's LoRA adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mbf.inject import inference_adapter, lora_layers
from mbf.io import atomic_save_safetensors, atomic_write_text

__all__ = ["save_peft_adapter"]


def save_peft_adapter(model: nn.Module, path: str | Path, which: str = "auto") -> Path:
    """Export one adapter of every LoRALinear in PEFT's format (loadable by ``PeftModel.from_pretrained``).

    Args:
        model: a model after ``mbf.inject``.
        path: output directory (``adapter_model.safetensors`` + ``adapter_config.json``).
        which: ``"merged"`` (SLAO's merged adapter), ``"finetuned"``, or ``"auto"``: the one inference
            uses (the merged adapter once a task has been merged, the fine-tuned one before).

    Raises:
        ValueError: on an unknown ``which`` or a model without LoRA layers.
    """
    if which not in ("auto", "merged", "finetuned"):
        raise ValueError(f"which={which!r} must be 'auto', 'merged' or 'finetuned'")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to export")
    which = inference_adapter(layers) if which == "auto" else which
    tensors = {}
    for name, layer in layers.items():
        A, B = (layer.merged_A, layer.merged_B) if which == "merged" else (layer.lora_A, layer.lora_B)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    path = Path(path)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors")
    atomic_write_text(json.dumps(config, indent=2), path / "adapter_config.json")
    return path

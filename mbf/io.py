"""Saving and loading: atomic writes (a crash never leaves a half-written file) and PEFT's format."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_save_safetensors", "atomic_write_text", "load_safetensors", "save_peft_adapter"]


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_peft_adapter(model: torch.nn.Module, path: str | Path, which: str = "merged") -> Path:
    """Export one adapter of every LoRALinear in PEFT's format (loadable by ``PeftModel.from_pretrained``).

    Args:
        model: a model after ``mbf.inject``.
        path: output directory (``adapter_model.safetensors`` + ``adapter_config.json``).
        which: ``"merged"`` (what inference uses) or ``"finetuned"``.

    Raises:
        ValueError: on an unknown ``which`` or a model without LoRA layers.
    """
    from mbf.inject import lora_layers

    if which not in ("merged", "finetuned"):
        raise ValueError(f"which={which!r} must be 'merged' or 'finetuned'")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to export")
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

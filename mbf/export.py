"""Adapter files: PEFT's LoRA format out, and what ``save_pretrained`` of an injected model writes.

``save_peft_adapter`` writes ``adapter_model.safetensors`` + ``adapter_config.json``, loadable by
``PeftModel.from_pretrained`` and ``mbf.load_peft_adapter``; its ``target_modules`` select exactly
the exported layers (their leaf names when those select no other linear, else their full names).

``inject`` makes an injected model's ``save_pretrained`` (on that instance) ``save_pretrained_adapters``:
the adapters alone, as a ``PeftModel`` saves itself. A transformers ``Trainer`` therefore checkpoints
and ``save_model()``s an injected model without any callback; its resume finds
``model.safetensors.index.json`` and loads the LoRA tensors from their one shard (the frozen base,
absent, stays as it is). No ``config.json`` is written, so ``from_pretrained`` of such a folder can
never build a model with silently re-initialised weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mbf.config import LoRAConfig
from mbf.io import atomic_save_safetensors, atomic_write_text
from mbf.nn import LoRALinear, linear_names, lora_layers, resolve_adapter
from mbf.nn.model import has_frozen_branches

__all__ = ["INDEX", "LORA_KEYS", "SHARD", "save_peft_adapter", "save_pretrained_adapters"]

LORA_KEYS = ("lora_A", "lora_B", "merged_A", "merged_B")  # a LoRALinear's tensors besides its base's
SHARD = "mbf-adapters-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"  # the name the Trainer's resume looks for (sharded checkpoints)


def _peft_targets(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    """``target_modules`` that select exactly ``layers`` under PEFT's (and mbf's) list rule."""
    leaves = sorted({n.rpartition(".")[2] for n in layers})
    by_leaf = LoRAConfig(target_modules=leaves)
    if {n for n in linear_names(model) if by_leaf.matches(n)} == set(layers):
        return leaves
    return sorted(layers)  # partial targeting (a regex, exclude_modules): the full names, matched exactly


def save_peft_adapter(
    model: nn.Module, path: str | Path, adapter: str | None = "auto", *, which: str | None = None
) -> Path:
    """Export one adapter of every LoRALinear in PEFT's format (loadable by ``PeftModel.from_pretrained``).

    Args:
        model: a model after ``mbf.inject``.
        path: output directory (``adapter_model.safetensors`` + ``adapter_config.json``).
        adapter: ``"merged"`` (SLAO's merged adapter), ``"finetuned"``, or ``"auto"``: the one
            inference uses (the merged adapter once a task has been merged, the fine-tuned one before).
        which: the former name of ``adapter``.

    Raises:
        ValueError: on an unknown ``adapter``, ``"merged"`` before any task was merged, a model
            without LoRA layers, or one with past tasks' frozen LoRAs (O-LoRA, InfLoRA) or a dense merged
            ΔW (task arithmetic / TIES) beside its own.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to export")
    if has_frozen_branches(model):
        raise ValueError(
            "the model computes with one frozen LoRA per past task (O-LoRA / InfLoRA) or a dense merged ΔW "
            "(task-arithmetic / ties) beside its own adapter: a PEFT adapter holds one per layer; save the "
            "strategy's checkpoint instead (cl.save), or merge with low_rank=True"
        )
    adapter = resolve_adapter(layers, which if which is not None else adapter)
    tensors = {}
    for name, layer in layers.items():
        A, B = (layer.merged_A, layer.merged_B) if adapter == "merged" else (layer.lora_A, layer.lora_B)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": _peft_targets(model, layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    path = Path(path)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors")
    atomic_write_text(json.dumps(config, indent=2), path / "adapter_config.json")
    return path


def save_pretrained_adapters(model: nn.Module, save_directory, *args, is_main_process: bool = True, **kwargs):
    """An injected model's ``save_pretrained``: the adapters alone (see the module docstring).

    Writes the PEFT export of the adapter inference uses and, for a Trainer's resume, every LoRA tensor
    (both adapters) under its ``state_dict`` key as a one-shard checkpoint. Other arguments of
    transformers' ``save_pretrained`` (``state_dict``, ``safe_serialization``...) are accepted and
    ignored: the tensors come from the layers. While past tasks' frozen LoRAs or a dense merged ΔW compute
    beside the adapters (O-LoRA, InfLoRA, task arithmetic / TIES) no PEFT adapter describes the model: the
    shard alone is written (the strategy's own state is its checkpoint: ``cl.save``, or the Trainer
    callback's ``<checkpoint>/<strategy>``).
    """
    if not is_main_process:
        return
    folder = Path(save_directory)
    if not has_frozen_branches(model):
        save_peft_adapter(model, folder)
    tensors = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in LORA_KEYS}
    atomic_save_safetensors(tensors, folder / SHARD)
    index = {"metadata": {"format": "mbf-adapter-only"}, "weight_map": {k: SHARD for k in tensors}}
    atomic_write_text(json.dumps(index, indent=1), folder / INDEX)

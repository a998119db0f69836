"""A strategy's checkpoint, written and read the one way (``mbf.checkpoint``'s format: crash-safe, the
tensors checksummed, the strategy named): what every strategy but ``ContinualLoRA`` (which predates
the field) uses for ``save`` and ``load``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbf import checkpoint
from mbf.inject import eject, inject, lora_layers

__all__ = ["read_strategy", "restore_strategy", "write_strategy"]


def write_strategy(
    strategy: Any, path: str | Path, tensors: dict[str, torch.Tensor], state: dict | None = None
) -> Path:
    """Write ``strategy``'s checkpoint into directory ``path``: its task counters, config
    (``strategy_options``), ``tensors`` (``"<layer>.<name>"``) and JSON ``state`` (``strategy_state``)."""
    lora_config = getattr(strategy.model, "mbf_lora_config", None)
    ckpt = checkpoint.Checkpoint(
        strategy.task_index, strategy.in_task, None, lora_config, tensors, strategy.strategy_name,
        strategy.config.to_dict(), state,
    )  # fmt: skip
    return checkpoint.write_checkpoint(path, ckpt)


def read_strategy(cls: type, model: nn.Module, path: str | Path, config: Any = None) -> Any:
    """``cls`` rebuilt from ``write_strategy``'s checkpoint in ``path``: ``cls(model, config)`` (None: the
    saved config), then ``strategy._restore(ckpt)``, which validates everything before it assigns.

    Injects the saved LoRAConfig first when the model has no LoRA layers, and ejects it again when
    loading fails (all or nothing).

    Raises:
        FileNotFoundError, ValueError, KeyError: a missing, malformed, corrupted or mismatched checkpoint,
            or one of another strategy (the message names the file, field or tensor).
    """
    ckpt = checkpoint.read_checkpoint(path, strategy=cls.strategy_name)
    injected = not lora_layers(model)
    if injected:
        if ckpt.lora_config is None:
            raise ValueError(f"{path}: model has no LoRA layers and no LoRAConfig was saved")
        inject(model, ckpt.lora_config)
    try:
        checkpoint.check_lora_config(path, ckpt.lora_config, getattr(model, "mbf_lora_config", None))
        try:
            saved = cls.config_class.from_dict(ckpt.options or {})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: strategy_options: {err}") from err
        strategy = cls(model, config if config is not None else saved)
        strategy._restore(ckpt)
    except BaseException:
        if injected:
            eject(model)
        raise
    return strategy


def restore_strategy(strategy: Any, path: str | Path) -> None:
    """Load ``write_strategy``'s checkpoint in ``path`` into ``strategy`` in place (a Trainer's resume keeps
    its callback's object): ``strategy._restore(ckpt)``, which validates everything before it assigns.

    Raises:
        FileNotFoundError, ValueError, KeyError: as ``read_strategy``; ValueError also when the checkpoint
            was saved with another config than the strategy's.
    """
    ckpt = checkpoint.read_checkpoint(path, strategy=strategy.strategy_name)
    checkpoint.check_lora_config(path, ckpt.lora_config, getattr(strategy.model, "mbf_lora_config", None))
    try:
        saved = type(strategy.config).from_dict(ckpt.options or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: strategy_options: {err}") from err
    if saved != strategy.config:
        raise ValueError(
            f"{path}: saved with {saved} but this {strategy.strategy_name} runs {strategy.config}"
        )
    strategy._restore(ckpt)

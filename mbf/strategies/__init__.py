"""Continual strategies: SLAO (``slao``: ``mbf.ContinualLoRA``) and the methods it is measured against
(``olora``, ``inflora``, ``task_merge``, ``sketch``; ``replay``, a plugin that wraps any of them), behind
one small protocol with optional hooks (``mbf.strategies.base``) that one task driver runs
(``mbf.strategies.loop``).

``strategy_classes()`` names every strategy class; ``make_strategy(model, config)`` builds the one whose
``config_class`` the config is; ``load_strategy(model, path)`` rebuilds whichever strategy saved a
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mbf import checkpoint
from mbf.strategies.base import ContinualStrategy, StrategyConfig, StrategyDefaults, hook
from mbf.strategies.inflora import InfLoRA
from mbf.strategies.olora import OLoRA
from mbf.strategies.replay import ExperienceReplay, Replay
from mbf.strategies.sketch import SketchMerge
from mbf.strategies.slao import ContinualConfig, ContinualLoRA
from mbf.strategies.task_merge import TaskMergeLoRA

__all__ = [
    "ContinualConfig", "ContinualLoRA", "ContinualStrategy", "ExperienceReplay", "InfLoRA", "OLoRA", "Replay",
    "SketchMerge", "StrategyConfig", "StrategyDefaults", "TaskMergeLoRA", "hook", "load_strategy",
    "make_strategy", "strategy_classes",
]  # fmt: skip


def strategy_classes() -> dict[str, type]:
    """``{strategy_name: class}`` of every strategy (a new strategy is added here)."""
    classes = (ContinualLoRA, OLoRA, InfLoRA, TaskMergeLoRA, ExperienceReplay, SketchMerge)
    return {cls.strategy_name: cls for cls in classes}


def _class_of(config: Any) -> type:
    for cls in strategy_classes().values():
        if isinstance(config, cls.config_class):
            return cls
    raise TypeError(f"no strategy takes a {type(config).__name__} (known: {', '.join(strategy_classes())})")


def make_strategy(model: nn.Module, config: Any) -> ContinualStrategy:
    """The strategy that ``config`` configures (e.g. ``ContinualConfig`` → ``ContinualLoRA``), on ``model``.

    Raises:
        TypeError: a config no strategy takes.
    """
    return _class_of(config)(model, config)


def load_strategy(model: nn.Module, path: str | Path, *, config: Any = None) -> ContinualStrategy:
    """Rebuild the strategy that saved the checkpoint in ``path`` (``config``: the method from now on).

    Raises:
        FileNotFoundError, KeyError: as the strategy's ``load``.
        ValueError: as the strategy's ``load``; an unknown strategy, or a ``config`` of another strategy
            than the one that saved it.
    """
    name, classes = checkpoint.saved_strategy(path), strategy_classes()
    if name not in classes:
        raise ValueError(f"{path}: saved by an unknown strategy {name!r} (known: {', '.join(classes)})")
    cls = classes[name]
    if config is not None and not isinstance(config, cls.config_class):
        raise ValueError(
            f"{path}: saved by the {name!r} strategy, which cannot continue with a {type(config).__name__}"
        )
    return cls.load(model, path, config=config)

"""The protocol of a continual strategy: a few required calls, optional named hooks, a plugin.

Required (``ContinualStrategy``): ``begin_task()``, ``end_task()``, ``trainable_parameters()``,
``save(path)``, ``load(model, path)`` (and ``restore(path)``: the same, in place), with the task counters
(``task_index``, ``in_task``), the model, and a name and config for checkpoints and results.json.

Optional hooks, each with a default in ``StrategyDefaults`` (``hook(strategy, name)`` gives a strategy's
own or that default, so a strategy written without the base class still runs):

- per step (``StepHooks``): ``loss_term()``, added to every micro-batch's loss (O-LoRA's regulariser);
  ``after_step()`` after every optimizer step (SLAO's strict mode projects there);
- input statistics (``InputHooks``): ``wants_inputs``, ``observe_inputs(forward)`` (InfLoRA, sketch-merge);
- evaluation adapter (``EvalHooks``): ``merged()``, the adapter inference uses; ``adapter_mode(mode)``;
  ``finetuned_differs``: the task's own adapter computes otherwise than ``merged()``;
- memory accounting (``MemoryHooks``): ``adapter_bytes()``, ``optimizer_bytes()``, ``buffered()``;
- training data (``DataHooks``): ``training_examples(i, seen)``, what a data-using plugin trains on
  (``mbf.strategies.replay.Replay`` wraps any strategy with it).

The order of the calls is code, not prose: ``mbf.strategies.loop`` runs one task through them (``mbf
continual``'s run and the transformers callback both use it).

A strategy's class names itself (``strategy_name``, written into its checkpoints) and its frozen config
dataclass (``config_class``, with ``to_dict`` / ``from_dict``: results.json's ``"options"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mbf.config import known_fields
from mbf.nn.lora import LoRALinear
from mbf.nn.model import lora_layers, release_hooks
from mbf.strategies.saving import restore_strategy

__all__ = [
    "ADAM_MOMENTS", "HOOKS", "REQUIRED", "ContinualStrategy", "DataHooks", "EvalHooks", "InputHooks",
    "MemoryHooks", "StepHooks", "StrategyConfig", "StrategyDefaults", "hook",
]  # fmt: skip

ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq per trained element


@runtime_checkable
class ContinualStrategy(Protocol):
    """What every strategy has: the task boundaries, what trains, and its state on disk."""

    strategy_name: ClassVar[str]  # its checkpoints' "strategy" (ContinualLoRA: "slao", for all its ablations)
    config_class: ClassVar[type]  # its frozen config dataclass (to_dict / from_dict)
    config: Any  # an instance of config_class: what results.json records as "options"
    model: nn.Module
    task_index: int  # finished tasks
    in_task: bool  # between begin_task() and end_task()

    def begin_task(self) -> None:
        """Prepare the adapter that task ``task_index + 1`` trains."""

    def end_task(self) -> None:
        """Close the task: what inference uses from now on includes it; ``task_index`` advances."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer of the current task gets."""

    def save(self, path: str | Path) -> Path:
        """Write the state into directory ``path`` (``mbf.checkpoint``: crash-safe, checksummed)."""

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, *, config: Any = None) -> ContinualStrategy:
        """Rebuild from ``save(path)``; ``config``: the method from now on (None: the saved one)."""

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (its config must be the saved one)."""


# what a driver may call on every strategy (ContinualStrategy's members but its name and config)
REQUIRED = ("begin_task", "end_task", "trainable_parameters", "save", "load", "restore", "task_index",
            "in_task")  # fmt: skip


class StepHooks(Protocol):
    """Per optimizer step: an extra loss (O-LoRA's regulariser), a correction after (SLAO's strict mode)."""

    def loss_term(self) -> torch.Tensor | None:
        """A 0-d term added to the task loss of every micro-batch (None: nothing to add)."""

    def after_step(self) -> None:
        """Runs after every optimizer step."""


class InputHooks(Protocol):
    """Input statistics around the task boundaries (InfLoRA's and sketch-merge's covariances)."""

    wants_inputs: bool  # True: the loop calls observe_inputs() before begin_task() and before end_task()

    def observe_inputs(self, forward: Callable[[], None]) -> None:
        """Watch the adapted layers' inputs while ``forward()`` runs the model over the task's training
        inputs (no gradient)."""


class EvalHooks(Protocol):
    """Which adapter evaluation uses (default: the model as it is, one adapter)."""

    finetuned_differs: bool  # True: the task's own adapter computes otherwise than merged() does

    def merged(self) -> AbstractContextManager[nn.Module]:
        """Inside the block the model computes with the adapter inference uses."""

    def adapter_mode(self, mode: str) -> AbstractContextManager[nn.Module]:
        """Inside the block the model computes with ``mode`` (``"finetuned"``: the task's own adapter)."""


class MemoryHooks(Protocol):
    """What the method holds, for results.json's memory columns."""

    def adapter_bytes(self) -> int:
        """Bytes of adapter state the method holds now (what grows with T for O-LoRA and InfLoRA)."""

    def optimizer_bytes(self) -> int:
        """Bytes of optimizer state a task's training holds (AdamW's two moments of the trained tensors)."""

    def buffered(self) -> list | None:
        """The training examples the strategy keeps (a replay buffer; None: it keeps none)."""


class DataHooks(Protocol):
    """What a task trains on (a data-using plugin: replay)."""

    def training_examples(self, task_index: int, seen: Sequence[Sequence]) -> list:
        """What task ``task_index`` (0-based) trains on, given the training examples of tasks
        ``0..task_index`` (``seen[-1]`` is the current task's). Must depend on its arguments and the
        config only: a resumed run calls it again for the task it resumes at."""


HOOKS = (  # the optional members, by the protocol that names them
    "loss_term", "after_step",  # StepHooks
    "wants_inputs", "observe_inputs",  # InputHooks
    "finetuned_differs", "merged", "adapter_mode",  # EvalHooks
    "adapter_bytes", "optimizer_bytes", "buffered",  # MemoryHooks
    "training_examples",  # DataHooks
)  # fmt: skip


class StrategyConfig:
    """``to_dict`` / ``from_dict`` of a strategy's frozen config dataclass (results.json's "options")."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a subclass is a dataclass

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        """Inverse of ``to_dict``; fields an older file lacks take their defaults.

        Raises:
            ValueError: not a mapping, a field the config does not have (named), or a value it refuses.
        """
        return cls(**known_fields(cls, data))


class StrategyDefaults:
    """The defaults of every optional hook (nothing added, nothing watched, the task's own data, one
    adapter), and what a strategy's ``__init__`` and boundaries share."""

    config_class: ClassVar[type]
    config: Any
    model: nn.Module
    layers: dict[str, LoRALinear]
    task_index: int
    in_task: bool
    wants_inputs: bool = False
    finetuned_differs: bool = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError(f"{type(self).__name__} must say what trains")

    @classmethod
    def _config_of(cls, config: Any, options: dict) -> Any:
        """``config`` (None: ``config_class()``) with ``options`` overriding its fields.

        Raises:
            ValueError: an option the config does not have (named).
        """
        config = config if config is not None else cls.config_class()
        unknown = sorted(set(options) - set(config.to_dict()))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
        return replace(config, **options) if options else config

    def _check_task(self, opening: bool) -> None:
        """Raise RuntimeError when ``begin_task`` (``opening``) finds a task open, or ``end_task`` none."""
        if opening and self.in_task:
            raise RuntimeError(f"task {self.task_index + 1} already begun; call end_task() first")
        if not opening and not self.in_task:
            raise RuntimeError("end_task() without begin_task()")

    def _take(self, model: nn.Module, config: Any, options: dict, release: bool = True) -> None:
        """What a strategy's ``__init__`` starts with: its config (``_config_of``), ``model``, its LoRA
        ``layers`` and the task counters at 0; the hooks of an earlier strategy on the model are removed
        (unless not ``release``).

        Raises:
            ValueError: an unknown option, or a model without LoRA layers.
        """
        self.config = self._config_of(config, options)
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("model has no LoRA layers: call mbf.inject(model, LoRAConfig(...)) first")
        self.model, self.task_index, self.in_task = model, 0, False
        if release:  # an earlier strategy's per-task LoRAs or merged ΔW no longer compute
            release_hooks(model)

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (``mbf.strategies.saving.restore_strategy``; a
        transformers Trainer's resume keeps its callback's object).

        Raises:
            FileNotFoundError, ValueError, KeyError: as ``load``; ValueError also when the checkpoint was
                saved with another config than this object's.
        """
        restore_strategy(self, path)

    # -- the optional hooks' defaults ---------------------------------------------------------------

    def loss_term(self) -> torch.Tensor | None:
        """Nothing added to the task loss."""
        return None

    def after_step(self) -> None:
        """Nothing after an optimizer step."""

    def observe_inputs(self, forward: Callable[[], None]) -> None:
        """Not watched: runs nothing (``wants_inputs`` is False)."""

    @contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """Inside the block the model computes with the adapter inference uses: ``adapter_mode("merged")``."""
        with hook(self, "adapter_mode")("merged"):
            yield self.model

    @contextmanager
    def adapter_mode(self, mode: str) -> Iterator[nn.Module]:
        """One adapter: every mode is the model as it is."""
        yield self.model

    def adapter_bytes(self) -> int:
        """The trained tensors' bytes (a strategy holding more says so)."""
        return _trained_bytes(self)

    def optimizer_bytes(self) -> int:
        """AdamW's two moments of every trained tensor, in the trained tensors' dtype (fp32 adapters)."""
        return ADAM_MOMENTS * _trained_bytes(self)

    def buffered(self) -> list | None:
        """No training examples kept (data-free)."""
        return None

    def training_examples(self, task_index: int, seen: Sequence[Sequence]) -> list:
        """The current task's examples, as they are."""
        return list(seen[-1])


def _trained_bytes(strategy: Any) -> int:
    return sum(p.numel() * p.element_size() for p in strategy.trainable_parameters())


def hook(strategy: Any, name: str) -> Any:
    """``strategy``'s optional hook ``name`` (a bound method or a flag), or ``StrategyDefaults``' default.

    Raises:
        ValueError: ``name`` is not an optional hook (``HOOKS``).
    """
    if name not in HOOKS:
        raise ValueError(f"{name!r} is not an optional hook of a strategy ({', '.join(HOOKS)})")
    found = getattr(strategy, name, None)
    if found is not None:
        return found
    default = getattr(StrategyDefaults, name)
    return default.__get__(strategy) if callable(default) else default

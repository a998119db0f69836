"""The protocol every continual strategy satisfies, so that one training loop drives them all.

A strategy owns the LoRA layers of one model across a task sequence. The loop
(``mbf.experiment.run``, or a user's own) drives it as follows; members marked *optional* have a
default in ``StrategyDefaults``::

    cl = make_strategy(model, config)              # or load_strategy(model, path) to resume
    for i, task in enumerate(tasks):
        examples = cl.training_examples(i, [t.train for t in tasks[: i + 1]])  # optional (replay)
        if cl.wants_inputs:                        # optional (InfLoRA): the task's inputs, seen
            cl.observe_inputs(lambda: run_model_on(task.train))   # before begin_task
        cl.begin_task()
        opt = AdamW(cl.trainable_parameters())
        for batch in batches(examples):
            loss = task_loss(model, batch)
            extra = cl.loss_term()                 # optional (O-LoRA's regulariser); None: nothing
            (loss if extra is None else loss + extra).backward()
            opt.step(); cl.after_step()            # optional (SLAO's strict mode projects here)
        if cl.wants_inputs:
            cl.observe_inputs(lambda: run_model_on(task.train))   # again, before end_task
        cl.end_task()
        with cl.merged(): evaluate(model)          # the adapter inference uses
        if cl.finetuned_differs:                   # optional: the task's own adapter differs from it
            with cl.adapter_mode("finetuned"): evaluate(model, task)
        cl.save(path)                              # resume: load_strategy(model, path) (in place: restore)
        record(cl.adapter_bytes(), cl.optimizer_bytes(), cl.buffered())   # buffered: optional (replay)

A strategy's class names itself (``strategy_name``, written into its checkpoints) and its frozen
config dataclass (``config_class``, with ``to_dict`` / ``from_dict``: results.json's ``"options"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mbf.nn.model import lora_layers, release_hooks
from mbf.strategies.saving import restore_strategy

__all__ = ["ADAM_MOMENTS", "ContinualStrategy", "StrategyConfig", "StrategyDefaults"]

ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq per trained element


@runtime_checkable
class ContinualStrategy(Protocol):
    """What the training loop uses of a strategy (see the module docstring for the order of calls)."""

    strategy_name: ClassVar[str]  # its checkpoints' "strategy" (ContinualLoRA: "slao", for all its ablations)
    config_class: ClassVar[type]  # its frozen config dataclass (to_dict / from_dict)
    config: Any  # an instance of config_class: what results.json records as "options"
    model: nn.Module
    task_index: int  # finished tasks
    in_task: bool  # between begin_task() and end_task()
    wants_inputs: bool  # True: call observe_inputs() before begin_task() and before end_task()
    finetuned_differs: bool  # True: the task's own adapter computes otherwise than merged() does

    def begin_task(self) -> None:
        """Prepare the adapter that task ``task_index + 1`` trains."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer of the current task gets."""

    def loss_term(self) -> torch.Tensor | None:
        """A 0-d term added to the task loss of every micro-batch (None: nothing to add)."""

    def after_step(self) -> None:
        """Runs after every optimizer step."""

    def training_examples(self, task_index: int, seen: Sequence[Sequence]) -> list:
        """What task ``task_index`` (0-based) trains on, given the training examples of tasks
        ``0..task_index`` (``seen[-1]`` is the current task's). Must depend on its arguments and the
        config only: a resumed run calls it again for the task it resumes at."""

    def buffered(self) -> list | None:
        """The training examples the strategy keeps (a data-using method's replay buffer; None: it keeps
        none): what the loop counts as its buffer's memory."""

    def observe_inputs(self, forward: Callable[[], None]) -> None:
        """Watch the adapted layers' inputs while ``forward()`` runs the model over the task's training
        inputs (no gradient): before ``begin_task()`` and again before ``end_task()``."""

    def end_task(self) -> None:
        """Close the task: what inference uses from now on includes it; ``task_index`` advances."""

    def merged(self) -> AbstractContextManager[nn.Module]:
        """Inside the block the model computes with the adapter inference uses."""

    def adapter_mode(self, mode: str) -> AbstractContextManager[nn.Module]:
        """Inside the block the model computes with ``mode`` (``"finetuned"``: the task's own adapter)."""

    def adapter_bytes(self) -> int:
        """Bytes of adapter state the method holds now (what grows with T for O-LoRA and InfLoRA)."""

    def optimizer_bytes(self) -> int:
        """Bytes of optimizer state a task's training holds (AdamW's two moments of the trained tensors)."""

    def save(self, path: str | Path) -> Path:
        """Write the state into directory ``path`` (``mbf.checkpoint``: crash-safe, checksummed)."""

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, *, config: Any = None) -> ContinualStrategy:
        """Rebuild from ``save(path)``; ``config``: the method from now on (None: the saved one)."""

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (its config must be the saved one)."""


class StrategyConfig:
    """``to_dict`` / ``from_dict`` of a strategy's frozen config dataclass (results.json's "options")."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        """Inverse of ``to_dict``; fields an older file lacks take their defaults.

        Raises:
            ValueError: a field the config does not have (named), or a value it refuses.
        """
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))  # type: ignore[attr-defined]
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


class StrategyDefaults:
    """Defaults of the protocol's optional members: nothing added, nothing watched, the task's own data."""

    wants_inputs: bool = False
    finetuned_differs: bool = False

    @classmethod
    def _config_of(cls, config: Any, options: dict) -> Any:
        """``config`` (None: ``config_class()``) with ``options`` overriding its fields.

        Raises:
            ValueError: an option the config does not have (named).
        """
        config = config if config is not None else cls.config_class()  # type: ignore[attr-defined]
        unknown = sorted(set(options) - set(config.to_dict()))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
        return replace(config, **options) if options else config

    @contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """Inside the block the model computes with the adapter inference uses: ``adapter_mode("merged")``."""
        with self.adapter_mode("merged"):  # type: ignore[attr-defined]
            yield self.model  # type: ignore[attr-defined]

    def _check_task(self, opening: bool) -> None:
        """Raise RuntimeError when ``begin_task`` (``opening``) finds a task open, or ``end_task`` none."""
        in_task, task = self.in_task, self.task_index + 1  # type: ignore[attr-defined]
        if opening and in_task:
            raise RuntimeError(f"task {task} already begun; call end_task() first")
        if not opening and not in_task:
            raise RuntimeError("end_task() without begin_task()")

    def _take(self, model: nn.Module, config: Any, options: dict) -> None:
        """What a strategy's ``__init__`` starts with: its config (``_config_of``), ``model``, its LoRA
        ``layers`` and the task counters at 0; the hooks of an earlier strategy on the model are removed.

        Raises:
            ValueError: an unknown option, or a model without LoRA layers.
        """
        self.config = self._config_of(config, options)
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("model has no LoRA layers: call mbf.inject(model, LoRAConfig(...)) first")
        self.model, self.task_index, self.in_task = model, 0, False
        release_hooks(model)  # an earlier strategy's per-task LoRAs or merged ΔW no longer compute

    def loss_term(self) -> torch.Tensor | None:
        """Nothing added to the task loss."""
        return None

    def after_step(self) -> None:
        """Nothing after an optimizer step."""

    def training_examples(self, task_index: int, seen: Sequence[Sequence]) -> list:
        """The current task's examples, as they are."""
        return list(seen[-1])

    def buffered(self) -> list | None:
        """No training examples kept (data-free)."""
        return None

    def observe_inputs(self, forward: Callable[[], None]) -> None:
        """Not watched: runs nothing (``wants_inputs`` is False)."""

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (``mbf.strategies.saving.restore_strategy``; a
        transformers Trainer's resume keeps its callback's object).

        Raises:
            FileNotFoundError, ValueError, KeyError: as ``load``; ValueError also when the checkpoint was
                saved with another config than this object's.
        """
        restore_strategy(self, path)

    def optimizer_bytes(self) -> int:
        """AdamW's two moments of every trained tensor, in the trained tensors' dtype (fp32 adapters)."""
        params: Iterator[nn.Parameter] = iter(self.trainable_parameters())  # type: ignore[attr-defined]
        return sum(ADAM_MOMENTS * p.numel() * p.element_size() for p in params)

"""Experience replay over sequential LoRA: the data-using reference among the methods SLAO is compared with.

Replay is **not data-free**: it keeps raw training examples of past tasks and trains on them again,
which SLAO, the merges and the other LoRA methods of the comparison never do. It answers "how much
would keeping a little data buy?", not a like-for-like rival of a data-free method.

Task ``i`` trains one LoRA on and on (sequential LoRA: ``ContinualLoRA`` with no QR init and λ ≡ 1)
on its own examples plus the buffers of all earlier tasks, shuffled together into its batches
(``training_examples``). A task's buffer is a fixed ``max(1, round(fraction · n))`` of its ``n``
training examples (default 2 %), drawn by reservoir sampling (Vitter's Algorithm R: one pass, every
example equally likely) with a generator seeded by ``config.seed`` and the task's position, so a
resumed run draws the same buffer; the buffer (each task's kept example indices) is saved in the
checkpoint (``strategy_state``) and read back on resume. Memory: the kept examples grow with T
(``fraction`` of every task's data); the adapter is sequential LoRA's.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mbf import checkpoint
from mbf.config import ContinualConfig
from mbf.nn.model import release_hooks
from mbf.strategies.base import StrategyConfig, StrategyDefaults
from mbf.strategies.saving import read_strategy, write_strategy

__all__ = ["ExperienceReplay", "ReplayConfig", "buffer_size", "reservoir_sample"]

SEQUENTIAL = ContinualConfig(init="none", schedule="none")  # one LoRA fine-tuned on and on
T = TypeVar("T")


def reservoir_sample(items: Iterable[T], k: int, rng: random.Random) -> list[T]:
    """``k`` items drawn uniformly without replacement from a stream of unknown length, in one pass
    (Algorithm R, Vitter 1985): item ``n`` (0-based) replaces a random slot with probability
    ``k / (n + 1)``. Fewer than ``k`` items: all of them.

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"reservoir_sample: k={k} must be >= 1")
    sample: list[T] = []
    for n, item in enumerate(items):
        if n < k:
            sample.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = item
    return sample


def buffer_size(n: int, fraction: float) -> int:
    """Examples kept of a task with ``n`` training examples: ``max(1, round(fraction · n))``."""
    return max(1, round(fraction * n))


@dataclass(frozen=True)
class ReplayConfig(StrategyConfig):
    """Experience replay's options.

    Raises:
        ValueError: a fraction outside (0, 1], or a seed that is not an integer.
    """

    fraction: float = 0.02  # of each task's training examples kept for replay
    seed: int = 0  # with the task's position, seeds its buffer's draw (mbf continual: the run's --seed)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"ReplayConfig: fraction={f!r} must be in (0, 1]")
        object.__setattr__(self, "fraction", float(f))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ReplayConfig: seed={self.seed!r} must be an integer")


def draw_buffer(n: int, task: int, config: ReplayConfig) -> list[int]:
    """The indices (into its ``n`` training examples) that task ``task`` (0-based) keeps."""
    rng = random.Random(f"mbf-replay:{config.seed}:{task}")  # str seeds are stable across runs
    return reservoir_sample(range(n), buffer_size(n, config.fraction), rng)


class ExperienceReplay(StrategyDefaults):
    """Sequential LoRA trained on each task's examples plus the earlier tasks' buffers.

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: ``ReplayConfig`` (default: 2 % per task, seed 0); keyword options override its fields.

    Raises:
        ValueError: an unknown option, or a model without LoRA layers.
    """

    strategy_name, config_class = "replay", ReplayConfig

    def __init__(self, model, config: ReplayConfig | None = None, **options) -> None:
        from mbf.continual import ContinualLoRA  # mbf.continual imports this package's base

        self.config = self._config_of(config, options)
        self.lora = ContinualLoRA(model, SEQUENTIAL)
        release_hooks(model)  # an earlier strategy's per-task LoRAs or merged ΔW no longer compute
        self.kept: list[list[int]] = []  # per finished task: the indices of its buffered examples
        self._drawn: list[int] | None = None  # the current task's buffer, kept at end_task()
        self._buffered: list[Any] = []  # the kept examples themselves, once training_examples saw them

    model = property(lambda self: self.lora.model)
    layers = property(lambda self: self.lora.layers)
    task_index = property(lambda self: self.lora.task_index)
    in_task = property(lambda self: self.lora.in_task)

    def training_examples(self, task_index: int, seen: Sequence[Sequence]) -> list:
        """The current task's examples (``seen[-1]``) followed by every earlier task's buffer; draws the
        current task's own buffer (kept at ``end_task()``).

        Raises:
            ValueError: ``task_index`` is not the next task, ``seen`` does not hold one list per task up
                to it, or a saved buffer index is outside its task's examples (names the task).
        """
        if task_index != self.task_index or len(seen) != task_index + 1:
            raise ValueError(
                f"replay: training_examples({task_index}, {len(seen)} tasks' examples) but the next task is "
                f"{self.task_index} (give the examples of tasks 0..{self.task_index})"
            )
        replayed = []
        for t, (indices, examples) in enumerate(zip(self.kept, seen)):
            if indices and max(indices) >= len(examples):
                raise ValueError(
                    f"replay: task {t + 1}'s saved buffer holds example {max(indices)}, but the task has "
                    f"{len(examples)} training examples now: its data changed since the buffer was drawn"
                )
            replayed += [examples[k] for k in indices]
        current = list(seen[-1])
        self._drawn = draw_buffer(len(current), task_index, self.config)
        self._buffered = replayed + [current[k] for k in self._drawn]
        return current + replayed

    def buffered(self) -> list:
        """The kept examples of every task so far (the current one's included once drawn)."""
        return list(self._buffered)

    # -- the sequential LoRA underneath -------------------------------------------------------------

    def begin_task(self) -> None:
        """Sequential LoRA's: the adapter carries on from the previous task."""
        self.lora.begin_task()

    def trainable_parameters(self) -> list:
        return self.lora.trainable_parameters()

    def end_task(self) -> None:
        """Close the task and keep its buffer (drawn by ``training_examples``).

        Raises:
            RuntimeError: no task begun, or ``training_examples`` was not called for it.
            ValueError: as ``ContinualLoRA.end_task`` (a non-finite adapter).
        """
        if self.in_task and self._drawn is None:
            raise RuntimeError("replay: call training_examples() for the task before end_task()")
        self.lora.end_task()
        self.kept.append(self._drawn)
        self._drawn = None

    def merged(self):
        """The adapter inference uses (sequential LoRA's: the one just trained)."""
        return self.lora.merged()

    def adapter_mode(self, mode: str):
        return self.lora.adapter_mode(mode)

    def adapter_bytes(self) -> int:
        """Sequential LoRA's adapter state (the buffer is data, counted by the caller: ``buffered()``)."""
        return self.lora.adapter_bytes()

    # -- state ------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the adapters and the buffer (each task's kept example indices, ``strategy_state``) into
        directory ``path`` (``mbf.checkpoint``'s format: crash-safe, checksummed)."""
        return write_strategy(self, path, self.lora.state_dict()["tensors"], {"kept": self.kept})

    @classmethod
    def load(cls, model, path: str | Path, *, config: ReplayConfig | None = None) -> ExperienceReplay:
        """Rebuild from ``save(path)`` (all or nothing); the kept examples come back from the task data at
        the next ``training_examples`` call. ``config``: the method from now on (None: the saved one).

        Raises:
            FileNotFoundError, ValueError, KeyError: a missing, malformed, corrupted or mismatched
                checkpoint (the message names the file, field or tensor).
        """
        return read_strategy(cls, model, path, config)

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        kept = (ckpt.state or {}).get("kept")
        valid = isinstance(kept, list) and all(
            isinstance(ix, list)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ix)
            for ix in kept
        )
        if not valid or len(kept) != ckpt.task_index:
            raise ValueError(
                f"strategy_state.kept={kept!r}: must list the kept example indices of each of the "
                f"{ckpt.task_index} finished tasks"
            )
        self.lora.load_state_dict(
            {"task_index": ckpt.task_index, "in_task": ckpt.in_task, "tensors": ckpt.tensors}
        )
        self.kept, self._drawn, self._buffered = kept, None, []

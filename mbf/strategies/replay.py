"""Experience replay: a plugin any strategy can use (``Replay``), and sequential LoRA with it
(``ExperienceReplay``, the ``replay`` method): the data-using reference among the methods SLAO is
compared with.

Replay is **not data-free**: it keeps raw training examples of past tasks and trains on them again,
which SLAO, the merges and the other LoRA methods of the comparison never do. It answers "how much
would keeping a little data buy?", not a like-for-like rival of a data-free method.

Task ``i`` trains on its own examples plus the buffers of all earlier tasks, shuffled together into its
batches (``training_examples``; with a transformers Trainer, the ``ReplayDataset`` that ``dataset`` gives).
A task's buffer is a fixed ``max(1, round(fraction · n))`` of its ``n`` training examples (default 2 %),
drawn by reservoir sampling (Vitter's Algorithm R: one pass, every example equally likely) with a
generator seeded by ``config.seed`` and the task's position, so a resumed run draws the same buffer; the
buffer (each task's kept example indices) is saved with the checkpoint and read back on resume. Memory:
the kept examples grow with T (``fraction`` of every task's data); the adapter is the wrapped strategy's.

``Replay(strategy)`` wraps any strategy (SLAO + replay: ``Replay(mbf.ContinualLoRA(model))``);
``ExperienceReplay(model)`` is ``Replay`` over sequential LoRA (``ContinualLoRA`` with no QR init and λ ≡ 1).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import Dataset

from mbf import checkpoint
from mbf.distributed import is_writer
from mbf.io import atomic_write_json
from mbf.nn.model import release_hooks
from mbf.strategies.base import StrategyConfig, StrategyDefaults
from mbf.strategies.saving import read_strategy, restore_strategy, write_strategy
from mbf.strategies.slao import ContinualConfig, ContinualLoRA

__all__ = ["ExperienceReplay", "Replay", "ReplayConfig", "ReplayDataset", "buffer_size", "reservoir_sample"]

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


class ReplayDataset(Dataset):
    """Task ``len(seen) - 1``'s training examples followed by every earlier task's buffer: the dataset a
    transformers ``Trainer`` trains on for a task when replay is used (``Replay.dataset``).

    ``seen`` holds one indexable dataset per task so far (lists, ``torch`` or Hugging Face datasets; the
    current task's last). The buffers are ``draw_buffer``'s (a pure function of each task's size, its
    position and ``config``), so a resumed process builds the same dataset; ``ContinualCallback`` checks it
    against the strategy's saved buffers before the task begins. An epoch covers the replayed examples too.
    """

    def __init__(self, seen: Sequence[Sequence], config: ReplayConfig) -> None:
        if not seen:
            raise ValueError("ReplayDataset: give the training examples of at least the current task")
        self.seen, self.config = list(seen), config
        self.task_index = len(self.seen) - 1
        self.kept = [
            draw_buffer(len(ds), t, config) for t, ds in enumerate(self.seen)
        ]  # the current one's too
        self._index = [(self.task_index, k) for k in range(len(self.seen[-1]))]
        self._index += [(t, k) for t, ix in enumerate(self.kept[:-1]) for k in ix]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Any:
        t, k = self._index[i]
        return self.seen[t][k]


class Replay(StrategyDefaults):
    """Experience replay as a plugin: any strategy, trained on each task's examples plus the buffers of every
    earlier task (``training_examples`` in a training loop; ``dataset`` for a transformers ``Trainer``).

    Everything else (boundaries, hooks, loss terms, adapters) is the wrapped strategy's: SLAO + replay is
    ``Replay(mbf.ContinualLoRA(model), ReplayConfig(fraction=0.02))``. ``save`` writes the strategy's
    checkpoint and, beside it, ``replay.json`` (each finished task's kept example indices, checked on load).

    Args:
        strategy: the strategy to add replay to (a ``mbf.strategies`` strategy).
        config: ``ReplayConfig`` (default: 2 % per task, seed 0); keyword options override its fields.
    """

    config_class = ReplayConfig
    keeps_examples = True  # its training examples come from training_examples() / dataset()

    def __init__(self, strategy, config: ReplayConfig | None = None, **options) -> None:
        self.config = self._config_of(config, options)
        self.strategy = strategy
        self.kept: list[list[int]] = []  # per finished task: the indices of its buffered examples
        self._drawn: list[int] | None = None  # the current task's buffer, kept at end_task()
        self._buffered: list[Any] = []  # the kept examples themselves, once training_examples saw them

    strategy_name = property(lambda self: f"{self.strategy.strategy_name}+replay")
    model = property(lambda self: self.strategy.model)
    layers = property(lambda self: self.strategy.layers)
    task_index = property(lambda self: self.strategy.task_index)
    in_task = property(lambda self: self.strategy.in_task)
    wants_inputs = property(lambda self: self.strategy.wants_inputs)
    finetuned_differs = property(lambda self: self.strategy.finetuned_differs)

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's own extras (set_eval_adapter, lam...)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

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

    def dataset(self, seen: Sequence[Sequence]) -> ReplayDataset:
        """For a transformers ``Trainer``: task ``len(seen) - 1``'s dataset with the earlier tasks' buffers
        (``ReplayDataset``); give it as ``train_dataset`` with ``ContinualCallback(this strategy)``."""
        return ReplayDataset(seen, self.config)

    def check_dataset(self, dataset: Any) -> None:
        """Raise ValueError unless ``dataset`` is this replay's ``ReplayDataset`` for the next task (its
        buffers the saved ones); then take it as ``training_examples`` would (``ContinualCallback`` calls
        this before the task begins)."""
        if not isinstance(dataset, ReplayDataset):
            raise ValueError(
                f"{self.strategy_name}: the Trainer's train_dataset must be cl.dataset([task 1's data, ..., "
                f"this task's]) (a ReplayDataset: the task's examples plus the earlier buffers), not a "
                f"{type(dataset).__name__}"
            )
        if dataset.config != self.config:
            raise ValueError(
                f"replay: the dataset was drawn with {dataset.config}, this replay runs {self.config}"
            )
        self.training_examples(dataset.task_index, dataset.seen)
        if dataset.kept[:-1] != self.kept:
            raise ValueError(
                "replay: the dataset's buffers differ from the saved ones: the tasks' data changed"
            )

    def buffered(self) -> list:
        """The kept examples of every task so far (the current one's included once drawn)."""
        return list(self._buffered)

    # -- the wrapped strategy -----------------------------------------------------------------------

    def begin_task(self) -> None:
        self.strategy.begin_task()

    def trainable_parameters(self) -> list:
        return self.strategy.trainable_parameters()

    def loss_term(self):
        return self.strategy.loss_term()

    def after_step(self) -> None:
        self.strategy.after_step()

    def observe_inputs(self, forward) -> None:
        self.strategy.observe_inputs(forward)

    def end_task(self) -> None:
        """Close the task (the wrapped strategy's ``end_task``) and keep its buffer (drawn by
        ``training_examples``).

        Raises:
            RuntimeError: no task begun, or ``training_examples`` was not called for it.
            ValueError: as the wrapped strategy's ``end_task``.
        """
        if self.in_task and self._drawn is None:
            raise RuntimeError("replay: call training_examples() for the task before end_task()")
        self.strategy.end_task()
        self.kept.append(self._drawn)
        self._drawn = None

    def merged(self):
        """The wrapped strategy's adapter inference uses."""
        return self.strategy.merged()

    def adapter_mode(self, mode: str):
        return self.strategy.adapter_mode(mode)

    def adapter_bytes(self) -> int:
        """The wrapped strategy's adapter state (the buffer is data, counted by the caller: ``buffered``)."""
        return self.strategy.adapter_bytes()

    def optimizer_bytes(self) -> int:
        return self.strategy.optimizer_bytes()

    # -- state ------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """The wrapped strategy's checkpoint in directory ``path``, then ``replay.json`` beside it (the
        buffers: each finished task's kept example indices)."""
        path = self.strategy.save(path)
        if is_writer():
            state = {"format": REPLAY_FORMAT, "task_index": self.task_index, "config": self.config.to_dict(),
                     "kept": self.kept}  # fmt: skip
            atomic_write_json(state, Path(path) / REPLAY_FILE)
        return Path(path)

    @classmethod
    def load(cls, model, path: str | Path, *, config: ReplayConfig | None = None) -> Replay:
        """Rebuild from ``save(path)``: the wrapped strategy (``mbf.strategies.load_strategy``) and the
        buffers. ``config``: the replay's from now on (None: the saved one).

        Raises:
            FileNotFoundError, ValueError, KeyError: as ``load_strategy``; a missing or malformed
                ``replay.json`` or one of another task count than the strategy's checkpoint.
        """
        from mbf.strategies import load_strategy

        saved_config, kept = _read_replay(path)
        replay = cls(load_strategy(model, path), config if config is not None else saved_config)
        replay._set_kept(path, kept)
        return replay

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (the wrapped strategy's ``restore``)."""
        saved_config, kept = _read_replay(path)
        if saved_config != self.config:
            raise ValueError(f"{path}: saved with {saved_config} but this replay runs {self.config}")
        self.strategy.restore(path)
        self._set_kept(path, kept)

    def _set_kept(self, path, kept: list) -> None:
        _check_kept(kept, self.task_index, f"{path}/{REPLAY_FILE}: kept")
        self.kept, self._drawn, self._buffered = kept, None, []


REPLAY_FILE, REPLAY_FORMAT = "replay.json", "mbf-replay/1"


def _check_kept(kept: Any, tasks: int, what: str) -> None:
    valid = isinstance(kept, list) and all(
        isinstance(ix, list) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ix)
        for ix in kept
    )
    if not valid or len(kept) != tasks:
        raise ValueError(
            f"{what}={kept!r}: must list the kept example indices of each of the {tasks} finished tasks"
        )


def _read_replay(path: str | Path) -> tuple[ReplayConfig, list]:
    file = Path(path) / REPLAY_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: missing (a Replay checkpoint holds the buffers beside the strategy's)"
        )
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or data.get("format") != REPLAY_FORMAT:
            raise ValueError(f"format must be {REPLAY_FORMAT!r}")
        config = ReplayConfig.from_dict(data["config"])
        kept = data["kept"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file}: {err}") from err
    return config, kept


class ExperienceReplay(Replay):
    """Sequential LoRA trained on each task's examples plus the earlier tasks' buffers (``Replay`` over
    ``ContinualLoRA(model, SEQUENTIAL)``; its checkpoint is one file set, strategy ``"replay"``).

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: ``ReplayConfig`` (default: 2 % per task, seed 0); keyword options override its fields.

    Raises:
        ValueError: an unknown option, or a model without LoRA layers.
    """

    strategy_name, config_class = "replay", ReplayConfig

    def __init__(self, model, config: ReplayConfig | None = None, **options) -> None:
        config = self._config_of(config, options)
        super().__init__(ContinualLoRA(model, SEQUENTIAL), config)
        release_hooks(model)  # an earlier strategy's per-task LoRAs or merged ΔW no longer compute

    lora = property(lambda self: self.strategy)  # the sequential LoRA underneath

    def begin_task(self) -> None:
        """Sequential LoRA's: the adapter carries on from the previous task."""
        self.strategy.begin_task()

    def merged(self):
        """The adapter inference uses (sequential LoRA's: the one just trained)."""
        return self.strategy.merged()

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

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place."""
        restore_strategy(self, path)

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        kept = (ckpt.state or {}).get("kept")
        _check_kept(kept, ckpt.task_index, "strategy_state.kept")
        self.lora.load_state_dict(
            {"task_index": ckpt.task_index, "in_task": ckpt.in_task, "tensors": ckpt.tensors}
        )
        self.kept, self._drawn, self._buffered = kept, None, []

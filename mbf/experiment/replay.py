"""Experience replay: the data-using reference among the methods SLAO is compared with.

Replay is **not data-free**: it keeps raw training examples of past tasks and trains on them again,
which SLAO, the merges and the other LoRA methods of the comparison never do. It answers "how much
would keeping a little data buy?", not a like-for-like rival of a data-free method.

After each task a fixed buffer of that task's training examples is kept: ``max(1, round(fraction ·
n))`` of its ``n`` examples (default 2 %), drawn by reservoir sampling (Vitter's Algorithm R: one pass,
every example equally likely) with a generator seeded by the run's seed and the task's name, so a
resumed run draws the same buffer. Every later task trains on its own examples plus the buffers of
all earlier tasks, shuffled together into its batches (sequential LoRA underneath: one LoRA trained
on and on). The buffer (the examples themselves, with a SHA-256) is saved beside the run's checkpoint
(``replay.json``) and read back on resume.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mbf.experiment.tasks import Example, Task
from mbf.io import atomic_write_json

__all__ = ["FILE", "FORMAT", "ReplayBuffer", "buffer_size", "reservoir_sample"]

FORMAT = "mbf-replay-buffer/1"
FILE = "replay.json"  # inside a checkpoint folder
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


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class ReplayBuffer:
    """The kept examples of every finished task, in task order.

    Raises:
        ValueError: a fraction outside (0, 1].
    """

    fraction: float = 0.02  # of each task's training examples kept
    seed: int = 0  # the run's seed: with the task's name, seeds that task's draw
    kept: dict[str, list[Example]] = field(default_factory=dict)  # task name -> its buffered examples

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"--replay-fraction {f!r} must be in (0, 1]")

    def add(self, task: Task) -> list[Example]:
        """Draw and keep ``task``'s buffer (the same draw for the same seed and task); returns it."""
        rng = random.Random(f"mbf-replay:{self.seed}:{task.name}")  # str seeds are stable across runs
        self.kept[task.name] = reservoir_sample(task.train, buffer_size(len(task.train), self.fraction), rng)
        return self.kept[task.name]

    def examples(self, tasks: Sequence[Task]) -> list[tuple[Task, Example]]:
        """Every kept example with its task (from ``tasks``, which holds the buffered tasks).

        Raises:
            KeyError: a buffered task is not among ``tasks`` (named).
        """
        by_name = {t.name: t for t in tasks}
        missing = [n for n in self.kept if n not in by_name]
        if missing:
            raise KeyError(f"replay buffer holds task {missing[0]!r}, which is not in this run's tasks")
        return [(by_name[name], ex) for name, exs in self.kept.items() for ex in exs]

    def nbytes(self) -> int:
        """Bytes of the kept text (UTF-8 of every kept example's input and output)."""
        return sum(
            len(ex.input.encode()) + len(ex.output.encode()) for exs in self.kept.values() for ex in exs
        )

    # -- persistence ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        body = {
            "format": FORMAT,
            "fraction": self.fraction,
            "seed": self.seed,
            "kept": {name: [[ex.input, ex.output] for ex in exs] for name, exs in self.kept.items()},
        }
        return {**body, "sha256": _digest(body)}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/replay.json`` atomically (with the SHA-256 of its content)."""
        return atomic_write_json(self.to_dict(), Path(folder) / FILE)

    @classmethod
    def load(cls, folder: str | Path) -> ReplayBuffer:
        """Read ``folder/replay.json``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a replay buffer, or its content differs from its SHA-256 (names the file).
        """
        path = Path(folder) / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the replay buffer of this checkpoint is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a replay buffer (format {FORMAT!r})")
        body = {k: v for k, v in data.items() if k != "sha256"}
        if data.get("sha256") != _digest(body):
            raise ValueError(f"{path}: SHA-256 differs from its content: the file was modified or corrupted")
        kept = {name: [Example(i, o) for i, o in exs] for name, exs in data["kept"].items()}
        return cls(fraction=data["fraction"], seed=data["seed"], kept=kept)

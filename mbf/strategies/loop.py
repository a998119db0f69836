"""One task through a strategy's hooks, in the order every driver keeps: the protocol's call order as code.

    training_examples → observe_inputs → begin_task → steps (loss_term, after_step) → observe_inputs
    → end_task → evaluation under merged() (and adapter_mode("finetuned") where that differs) → save
    → memory record

``run_task`` runs all of it (``mbf continual``'s run, ``mbf.experiment.run``). A driver whose events come
apart calls the pieces (the transformers callback, ``mbf.integrations.trainer``: ``open_task`` when training
begins, the step hooks per optimizer step, ``close_task`` when it ends). The application's parts (the
optimizer loop, running the model over the task's inputs, evaluating, where to save) come in as callables.
Optional hooks a strategy lacks take their defaults (``mbf.strategies.base.hook``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mbf.strategies.base import ContinualStrategy, hook

__all__ = ["Memory", "TaskOutcome", "close_task", "evaluate", "memory", "open_task", "run_task"]

# the optimizer loop: (examples, trainable parameters, loss_term, after_step) -> its statistics
Train = Callable[[list, list[nn.Parameter], Callable[[], torch.Tensor | None], Callable[[], None]], Any]


@dataclass(frozen=True)
class Memory:
    """What a strategy holds after a task (its memory hooks)."""

    adapter_bytes: int  # adapter state, whatever it is (grows with T for the per-task-LoRA methods)
    optimizer_bytes: int  # AdamW's moments of the tensors a task trains
    buffered: list | None  # the training examples kept (replay's buffer); None: data-free


@dataclass(frozen=True)
class TaskOutcome:
    """What ``run_task`` measured of one task."""

    stats: Any  # what ``train`` returned
    train_s: float  # seconds from training_examples to end_task (input statistics included)
    merged: Any  # ``evaluate_merged()`` under ``merged()``: the adapter inference uses
    finetuned: Any  # ``evaluate_finetuned()`` under the task's own adapter; None where that is the merged one
    eval_s: float
    memory: Memory


def open_task(strategy: ContinualStrategy, forward: Callable[[], None]) -> None:
    """The task's input statistics (``observe_inputs(forward)``, where the strategy watches inputs), then
    ``begin_task()``. ``forward`` runs the model over the task's training inputs, without gradient."""
    if hook(strategy, "wants_inputs"):
        hook(strategy, "observe_inputs")(forward)
    strategy.begin_task()


def close_task(strategy: ContinualStrategy, forward: Callable[[], None]) -> None:
    """The inputs again after training (where watched), then ``end_task()``."""
    if hook(strategy, "wants_inputs"):
        hook(strategy, "observe_inputs")(forward)
    strategy.end_task()


def evaluate(
    strategy: ContinualStrategy, merged: Callable[[], Any], finetuned: Callable[[], Any]
) -> tuple[Any, Any]:
    """``(merged() under the adapter inference uses, finetuned() under the task's own adapter)``; the
    second is None (not run) where the strategy's own adapter is the merged one (``finetuned_differs``)."""
    with hook(strategy, "merged")():
        result = merged()
    if not hook(strategy, "finetuned_differs"):
        return result, None
    with hook(strategy, "adapter_mode")("finetuned"):
        return result, finetuned()


def memory(strategy: ContinualStrategy) -> Memory:
    """The strategy's memory hooks, read now."""
    adapter, optimizer = hook(strategy, "adapter_bytes")(), hook(strategy, "optimizer_bytes")()
    return Memory(adapter, optimizer, hook(strategy, "buffered")())


def run_task(
    strategy: ContinualStrategy,
    index: int,
    seen: Sequence[Sequence],
    *,
    train: Train,
    forward: Callable[[], None],
    evaluate_merged: Callable[[], Any],
    evaluate_finetuned: Callable[[], Any],
    save: Callable[[], Any],
) -> TaskOutcome:
    """Task ``index`` (0-based) through ``strategy``, every hook in its place.

    Args:
        strategy: a ``mbf.strategies`` strategy between two tasks (``task_index == index``).
        seen: the training examples of tasks ``0..index`` (the current task's last).
        train: the optimizer loop, ``(examples, params, loss_term, after_step) -> stats``: ``loss_term()``
            joins every micro-batch's loss when it gives a tensor, ``after_step()`` follows every step.
        forward: runs the model over the current task's training inputs (no gradient), for the strategies
            that watch them.
        evaluate_merged, evaluate_finetuned: ``() -> results`` under the two adapters (``evaluate``).
        save: writes the strategy's state after the task (``strategy.save(path)``, in the caller's context).

    Returns:
        The task's ``TaskOutcome``.
    """
    t0 = time.time()
    examples = hook(strategy, "training_examples")(index, seen)
    open_task(strategy, forward)
    params = strategy.trainable_parameters()
    stats = train(examples, params, hook(strategy, "loss_term"), hook(strategy, "after_step"))
    close_task(strategy, forward)
    t1 = time.time()
    merged, finetuned = evaluate(strategy, evaluate_merged, evaluate_finetuned)
    eval_s = time.time() - t1
    save()
    return TaskOutcome(stats, t1 - t0, merged, finetuned, eval_s, memory(strategy))

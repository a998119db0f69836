"""The task driver (``mbf.strategies.loop``): every hook in its place, and a strategy with the required
members alone runs through it on the hooks' defaults."""

from collections import OrderedDict
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import mbf
from mbf.strategies import ContinualStrategy, hook, loop
from mbf.strategies.base import HOOKS, REQUIRED


class Minimal:
    """The protocol's required members and nothing else (no base class)."""

    strategy_name, config_class = "minimal", dict

    def __init__(self, model: nn.Module, calls: list) -> None:
        self.model, self.config, self.calls = model, {}, calls
        self.task_index, self.in_task = 0, False
        self.weight = nn.Parameter(torch.zeros(3))

    def begin_task(self) -> None:
        self.calls.append("begin_task")
        self.in_task = True

    def end_task(self) -> None:
        self.calls.append("end_task")
        self.task_index, self.in_task = self.task_index + 1, False

    def trainable_parameters(self) -> list[nn.Parameter]:
        self.calls.append("trainable_parameters")
        return [self.weight]

    def save(self, path):
        self.calls.append("save")
        return path

    @classmethod
    def load(cls, model, path, *, config=None):
        raise NotImplementedError

    def restore(self, path) -> None:
        raise NotImplementedError


class Recording(Minimal):
    """Every optional hook too, each recording its call."""

    wants_inputs = finetuned_differs = True

    def training_examples(self, task_index, seen):
        self.calls.append("training_examples")
        return [*seen[-1], "replayed"]

    def observe_inputs(self, forward) -> None:
        self.calls.append("observe_inputs")
        forward()

    def loss_term(self):
        self.calls.append("loss_term")
        return torch.zeros(())

    def after_step(self) -> None:
        self.calls.append("after_step")

    @contextmanager
    def merged(self):
        self.calls.append("merged")
        yield self.model

    @contextmanager
    def adapter_mode(self, mode):
        self.calls.append(f"adapter_mode:{mode}")
        yield self.model

    def adapter_bytes(self) -> int:
        self.calls.append("adapter_bytes")
        return 7

    def optimizer_bytes(self) -> int:
        self.calls.append("optimizer_bytes")
        return 14

    def buffered(self):
        self.calls.append("buffered")
        return ["kept"]


def _run(cl, calls):
    def train(examples, params, loss_term, after_step):
        calls.append(f"train:{examples}")
        for _ in range(2):  # two optimizer steps of one micro-batch each
            loss_term()
            after_step()
        return {"steps": 2}

    return loop.run_task(
        cl, 0, [["a", "b"]], train=train, forward=lambda: calls.append("forward"),
        evaluate_merged=lambda: calls.append("eval merged") or "M",
        evaluate_finetuned=lambda: calls.append("eval finetuned") or "F",
        save=lambda: cl.save("somewhere"),
    )  # fmt: skip


def test_run_task_calls_every_hook_in_order():
    calls = []
    done = _run(Recording(nn.Linear(2, 2), calls), calls)
    assert calls == [
        "training_examples", "observe_inputs", "forward", "begin_task", "trainable_parameters",
        "train:['a', 'b', 'replayed']", "loss_term", "after_step", "loss_term", "after_step",
        "observe_inputs", "forward", "end_task",
        "merged", "eval merged", "adapter_mode:finetuned", "eval finetuned",
        "save", "adapter_bytes", "optimizer_bytes", "buffered",
    ]  # fmt: skip
    assert (done.stats, done.merged, done.finetuned) == ({"steps": 2}, "M", "F")
    assert done.memory == loop.Memory(7, 14, ["kept"]) and done.train_s >= 0 and done.eval_s >= 0


def test_a_strategy_with_the_required_members_alone_runs_on_the_defaults():
    calls = []
    cl = Minimal(nn.Linear(2, 2), calls)
    assert isinstance(cl, ContinualStrategy) and not any(hasattr(cl, name) for name in HOOKS)
    done = _run(cl, calls)
    # its own data, no input statistics, the model as it is for evaluation, not a second evaluation
    assert calls == ["begin_task", "trainable_parameters", "train:['a', 'b']", "end_task", "eval merged",
                     "save", "trainable_parameters", "trainable_parameters"]  # fmt: skip (the last 2: memory)
    assert done.finetuned is None and cl.task_index == 1
    # memory: the trained tensors, AdamW's two moments of them, no examples kept
    assert done.memory == loop.Memory(3 * 4, 2 * 3 * 4, None)
    assert hook(cl, "wants_inputs") is False and hook(cl, "finetuned_differs") is False
    with pytest.raises(ValueError, match="'begin_task' is not an optional hook"):
        hook(cl, "begin_task")


def test_every_built_in_strategy_has_the_required_members():
    model = nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8)))
    mbf.inject(model, mbf.LoRAConfig(r=2, target_modules=("q_proj",)))
    from mbf.strategies import Replay, strategy_classes

    small = {"sketch-merge": {"rank": 2, "sketch": 4}}  # its default rank 16 exceeds these layers'
    strategies = [cls(model, **small.get(name, {})) for name, cls in strategy_classes().items()]
    strategies.append(Replay(mbf.ContinualLoRA(model)))
    for cl in strategies:
        assert isinstance(cl, ContinualStrategy) and all(hasattr(cl, m) for m in REQUIRED), cl.strategy_name

"""One LoRA per task: the past tasks' LoRAs kept frozen beside the one being trained, and the strategy
base that O-LoRA and InfLoRA share.

Each adapted layer computes ``y = x W0ᵀ + b + s (x A_tᵀ) B_tᵀ + Σ_{k<t} s (x A_kᵀ) B_kᵀ``: the current
task's LoRA (the layer's own ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``) plus every finished
task's, kept as separate frozen factors stacked per layer, ``A_past`` ``(T·r, in)`` and ``B_past``
``(out, T·r)`` (so ``B_past A_past = Σ_k B_k A_k``): memory grows as ``O(T·(in + out)·r)``, as the
papers' methods do. A forward hook adds the past term (no dropout on it) after the layer's own
forward; folding it into W instead would give the same output (tested) but lose the per-task factors
that O-LoRA's loss needs. The term is each layer's ``extra_term``: ``layer.fold()`` and
``mbf.eject(model, fold=True)`` fold it with the layer's LoRA (what eval() computes), and the hook adds
nothing while the layer is folded. At ``end_task()`` the current LoRA is appended to the past and its ``B``
zeroed, so that it is not counted twice.

Single-process only (no DDP/FSDP gathering, unlike ``ContinualLoRA``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mbf import checkpoint
from mbf.nn.lora import MODES, ExtraTerm
from mbf.nn.model import FROZEN_BRANCHES as _HOOKS
from mbf.nn.model import LayerHooks, use_adapter
from mbf.strategies.base import StrategyDefaults
from mbf.strategies.saving import read_strategy, write_strategy

__all__ = ["BranchStrategy", "FrozenBranches"]

_OWN = ("lora_A", "lora_B")  # the layer tensors a branch strategy saves (its merged_* buffers stay unused)
_PAST = ("past_A", "past_B")  # FrozenBranches' tensors in a checkpoint: "<layer>.past_A"


class FrozenBranches(LayerHooks):
    """Every layer's frozen past LoRAs (stacked factors) and the forward hooks that add them.

    Creating one removes the hooks of the model's previous one: a model runs one set of past branches.
    """

    def __init__(self, model: nn.Module, layers: dict) -> None:
        previous = model.__dict__.pop(_HOOKS, None)
        if previous is not None:
            previous.remove()
        self.layers = layers
        self.A: dict[str, torch.Tensor | None] = dict.fromkeys(layers)  # (T·r, in) per layer
        self.B: dict[str, torch.Tensor | None] = dict.fromkeys(layers)  # (out, T·r) per layer
        self._handles = [m.register_forward_hook(partial(self._add, name)) for name, m in layers.items()]
        for name, layer in layers.items():  # a fold folds the past with the layer's LoRA, in every mode
            layer.extra_term = ExtraTerm(self, MODES, partial(self._folded_delta, name))
        model.__dict__[_HOOKS] = self

    def _add(self, name: str, layer, args, out: torch.Tensor) -> torch.Tensor:
        A, B = self.A[name], self.B[name]
        if A is None or layer.disabled or layer.folded:  # disable_adapter(): the base alone; folded: in W
            return out
        x = args[0].to(A.dtype)  # (..., in); the branch computes in the adapters' fp32, as LoRALinear's
        return out + (layer.scaling * ((x @ A.T) @ B.T)).to(out.dtype)  # (..., out)

    def active(self) -> bool:
        """True while a past task's LoRA computes (hooks on, a task finished)."""
        return bool(self._handles) and any(a is not None for a in self.A.values())

    def _folded_delta(self, name: str) -> torch.Tensor | None:
        """What layer ``name``'s hook adds, as a weight (``delta_weight``); None while it adds nothing."""
        return self.delta_weight(name) if self._handles and self.A[name] is not None else None

    @torch.no_grad()
    def push(self) -> None:
        """Append every layer's current LoRA to its past branches and zero its ``lora_B``."""
        for name, layer in self.layers.items():
            A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
            self.A[name] = A if self.A[name] is None else torch.cat([self.A[name], A], dim=0)
            self.B[name] = B if self.B[name] is None else torch.cat([self.B[name], B], dim=1)
            layer.lora_B.zero_()

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s Σ_k B_k A_k`` ``(out, in)`` of layer ``name``: what folding the past into W would add."""
        layer, A, B = self.layers[name], self.A[name], self.B[name]
        if A is None:
            return torch.zeros(layer.out_features, layer.in_features, dtype=layer.lora_A.dtype)
        return layer.scaling * (B @ A)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.past_A": (T·r, in), "<layer>.past_B": (out, T·r)}`` (empty before the first task)."""
        out = {}
        for name in self.layers:
            if self.A[name] is not None:
                out[f"{name}.past_A"], out[f"{name}.past_B"] = self.A[name], self.B[name]
        return out

    def load(self, tensors: dict[str, torch.Tensor], tasks: int) -> None:
        """Take the past branches of ``tensors`` (``tensors()``'s keys), ``tasks`` of them per layer.

        Raises:
            KeyError: a layer's past branch is missing, or there is one for a task never finished.
            ValueError: a shape that is not ``(tasks·r, in)`` / ``(out, tasks·r)`` (names the tensor).
        """
        loaded = {}
        for name, layer in self.layers.items():
            k = tasks * layer.r
            for key, shape in (("past_A", (k, layer.in_features)), ("past_B", (layer.out_features, k))):
                full = f"{name}.{key}"
                if tasks == 0:
                    if full in tensors:
                        raise KeyError(f"{full}: saved with no finished task")
                    continue
                if full not in tensors:
                    raise KeyError(f"{full}: missing from the saved state ({tasks} finished tasks)")
                if tuple(tensors[full].shape) != shape:
                    raise ValueError(f"{full}: saved shape {tuple(tensors[full].shape)} != {shape}")
                loaded[full] = tensors[full].to(layer.lora_A.device, layer.lora_A.dtype)
        unexpected = sorted(set(tensors) - set(loaded))
        if unexpected:
            raise KeyError(f"{unexpected[0]}: in the saved state but not a LoRA layer of this model")
        for name in self.layers:
            self.A[name], self.B[name] = loaded.get(f"{name}.past_A"), loaded.get(f"{name}.past_B")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class BranchStrategy(StrategyDefaults):
    """A strategy that trains a new LoRA per task and keeps the finished ones frozen (``FrozenBranches``).

    Subclasses set ``strategy_name``, ``config_class`` and ``trained`` (the factors that train), and
    override ``_init_task`` (the new LoRA's init, under no_grad), and where needed ``_before_end``,
    ``_extra_tensors`` / ``_extra_state`` and ``_load_extra``.

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: the method's config (default ``config_class()``); keyword options override its fields.

    Raises:
        ValueError: an unknown option or a model without LoRA layers.
    """

    strategy_name: ClassVar[str]
    config_class: ClassVar[type]
    trained: ClassVar[str] = "AB"

    def __init__(self, model: nn.Module, config: Any = None, **options) -> None:
        self._take(model, config, options)
        self.branches = FrozenBranches(model, self.layers)
        for layer in self.layers.values():  # eval() computes as training does: current LoRA + past ones
            layer.adapter_mode, layer.eval_adapter_mode = "finetuned", None

    # -- task boundaries --------------------------------------------------------------------------

    def begin_task(self) -> None:
        """Initialise the new task's LoRA (``_init_task``); only the ``trained`` factors take gradients.

        Raises:
            RuntimeError: when the previous task was not ended.
        """
        self._check_task(opening=True)
        with torch.no_grad():
            self._init_task()
        for layer in self.layers.values():
            layer.lora_A.requires_grad_("A" in self.trained)
            layer.lora_B.requires_grad_("B" in self.trained)
        self.in_task = True

    def _init_task(self) -> None:
        for layer in self.layers.values():
            layer.reset_lora_parameters()  # A Kaiming-uniform, B zero: the layer starts as it was

    def end_task(self) -> None:
        """Freeze the task's LoRA into the past branches; ``task_index`` advances.

        Raises:
            RuntimeError: when no task was begun.
            ValueError: a non-finite adapter (names the layer; the task stays open).
        """
        self._check_task(opening=False)
        for name, layer in self.layers.items():
            for t in (layer.lora_A, layer.lora_B):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name}: the task's adapter has non-finite values; refusing to keep it")
        self._before_end()
        self.branches.push()
        self.task_index += 1
        self.in_task = False

    def _before_end(self) -> None:
        """Runs in ``end_task()`` before the LoRA is frozen (InfLoRA updates its memory here)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current task's trained factors (``trained``)."""
        names = [f"lora_{f}" for f in self.trained]
        return [getattr(layer, n) for layer in self.layers.values() for n in names]

    @contextmanager
    def merged(self) -> Iterator[nn.Module]:
        """The model as inference uses it: every finished task's LoRA plus the current one (zero between
        tasks), i.e. the sum of all branches."""
        with use_adapter(self.layers.values(), "finetuned", 1.0):
            yield self.model

    @contextmanager
    def adapter_mode(self, mode: str) -> Iterator[nn.Module]:
        """``"finetuned"`` and ``"merged"`` are the same adapter here (the sum of all branches).

        Raises:
            ValueError: any other mode.
        """
        if mode not in ("finetuned", "merged"):
            raise ValueError(f"{self.strategy_name}: adapter mode {mode!r} must be 'finetuned' or 'merged'")
        with self.merged():
            yield self.model

    def adapter_bytes(self) -> int:
        """The current LoRA, every past task's (``T·(in + out)·r`` elements per layer) and the method's own
        state tensors (InfLoRA's memory bases)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def close(self) -> None:
        """Take the past branches' hooks off the model."""
        self.branches.remove()

    # -- state ------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        own = {f"{n}.{k}": getattr(layer, k).detach() for n, layer in self.layers.items() for k in _OWN}
        return {**own, **self.branches.tensors(), **self._extra_tensors()}

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _extra_state(self) -> dict | None:
        return None

    def _load_extra(self, tensors: dict[str, torch.Tensor], state: dict | None) -> None:
        """Take the method's own tensors / JSON state from a checkpoint (validate, then assign)."""

    def save(self, path: str | Path) -> Path:
        """Write the state into directory ``path`` (``mbf.checkpoint``'s format: crash-safe, checksummed).

        Raises:
            RuntimeError: inside a task (the method's per-task state is not saved): save after end_task().
        """
        if self.in_task:
            raise RuntimeError(f"{self.strategy_name} cannot be saved mid-task; save after end_task()")
        return write_strategy(self, path, self._tensors(), self._extra_state())

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, *, config: Any = None) -> BranchStrategy:
        """Rebuild from ``save(path)`` (``mbf.strategies.saving.read_strategy``: injects the saved LoRAConfig
        into a model without LoRA layers; all or nothing). ``config``: the method from now on (None: the
        saved one).

        Raises:
            FileNotFoundError, ValueError, KeyError: a missing, malformed, corrupted or mismatched
                checkpoint (the message names the file, field or tensor).
        """
        return read_strategy(cls, model, path, config)

    @torch.no_grad()
    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        suffix = lambda k: k.rpartition(".")[2]  # noqa: E731
        own = {k: t for k, t in ckpt.tensors.items() if suffix(k) in _OWN}
        rest = {k: t for k, t in ckpt.tensors.items() if suffix(k) not in _OWN}
        pairs = checkpoint.state_pairs(self.layers, own, keys=_OWN)
        past = {k: t for k, t in rest.items() if suffix(k) in _PAST}
        self.branches.load(past, ckpt.task_index)
        self._load_extra({k: t for k, t in rest.items() if k not in past}, ckpt.state)
        for dst, src in pairs:
            dst.copy_(src)
        self.task_index, self.in_task = ckpt.task_index, False

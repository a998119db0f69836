"""Per-task LoRA merging: one LoRA per task, all trained from the same start, merged after every task.

The baselines of LoRA merging that SLAO is compared with (issue 22 part 3):

- **task arithmetic** (Ilharco et al., ICLR 2023, "Editing Models with Task Arithmetic"):
  ``ΔW = λ Σ_{t≤i} τ_t`` with the task vector ``τ_t = s · B_t A_t`` of task t's LoRA;
- **TIES-merging** (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
  Models"): each ``τ_t`` trimmed to its top-k% magnitudes over the whole model (k = 20 as the
  paper), the sign of every entry elected as ``sgn(Σ_t τ̂_t)``, the disjoint mean over the tasks
  that agree with it, scaled by λ (``mbf.reference.ties_merge``).

Task ``i``: ``begin_task()`` resets every layer's fine-tuned adapter to the shared start (the
adapter as this object found it: the usual LoRA init, B = 0), so each task's LoRA learns its own
task alone; ``end_task()`` keeps the task's factors ``(A_i, B_i)`` and merges the task vectors of
tasks ``1..i``. The merges act on the full ``ΔW = s B A`` products (``(out, in)`` per layer), the
paper's task vectors, and the merged ``ΔW`` is applied at evaluation as a frozen per-layer delta
(``y += x ΔWᵀ`` in the ``"merged"`` mode, where the layer's merged LoRA adapter is zero). The
dense delta is each layer's ``extra_term`` in the ``"merged"`` mode: ``mbf.eject(model, fold=True)``
and ``layer.fold()`` fold it (what eval() computes), and its hook adds nothing while the layer is
folded. The low-rank variant (``low_rank=True``) instead keeps the rank-r truncated SVD of each layer's merged
``ΔW`` as the layer's merged adapter (``merged_A``, ``merged_B``): no dense delta, exportable as a
PEFT adapter, at the cost of what the truncation drops.

Memory: every task's factors are kept, ``O(T · (m + n) · r)`` per layer, growing with the number of
tasks T (SLAO holds two adapters whatever T); the full-ΔW variant also holds the merged ``m × n``
delta of every layer. Default λ: 0.4 for task arithmetic and 1 for TIES, with TIES keeping 20 %: the
values of the TIES authors' released minimal example (``src/ties_minimal.ipynb`` of
github.com/prateeky2806/ties-merging: ``K = 20``, ``dis-mean``, ``lamda = 1``; task vectors summed,
``lamda = 0.4``), whose trim is also over the whole flattened task vector and whose sign election is
also by mass. One difference: where the trimmed entries sum to exactly 0, that example elects the
majority sign of the whole model, this one keeps 0. Single-process (no DDP / FSDP gathering,
unlike ``ContinualLoRA``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbf import checkpoint
from mbf.functional.task_merge import (
    MERGES,
    check_density,
    low_rank_factors,
    merge_task_vectors,
    task_vector,
    ties_thresholds,
)
from mbf.nn.lora import ExtraTerm
from mbf.nn.model import MERGED_DELTAS, LayerHooks, use_adapter
from mbf.strategies.base import StrategyConfig, StrategyDefaults
from mbf.strategies.saving import read_strategy, write_strategy

__all__ = ["DEFAULT_LAMBDA", "MERGES", "TaskMergeConfig", "TaskMergeLoRA"]

DEFAULT_LAMBDA = {"task_arithmetic": 0.4, "ties": 1.0}  # the TIES authors' minimal example's values


@dataclass(frozen=True)
class TaskMergeConfig(StrategyConfig):
    """How the per-task LoRAs are merged.

    Raises:
        ValueError: an unknown merge, λ not finite and > 0, or a density outside (0, 1].
    """

    merge: str = "ties"  # "task_arithmetic" (λ Σ τ_t) or "ties" (trim, elect sign, disjoint mean)
    lam: float | None = None  # λ scaling the merged task vector (None: DEFAULT_LAMBDA of the merge)
    density: float = 0.2  # TIES: the fraction of each task vector's entries kept by the trim
    low_rank: bool = False  # keep the merged ΔW's rank-r truncated SVD as the merged adapter

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"TaskMergeConfig: merge={self.merge!r} must be one of {', '.join(MERGES)}")
        lam = DEFAULT_LAMBDA[self.merge] if self.lam is None else self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < float("inf"):
            raise ValueError(f"TaskMergeConfig: lam={lam!r} must be a finite number > 0")
        object.__setattr__(self, "lam", float(lam))
        check_density(self.density)
        object.__setattr__(self, "density", float(self.density))
        if not isinstance(self.low_rank, bool):
            raise ValueError(f"TaskMergeConfig: low_rank={self.low_rank!r} is not a bool")


class TaskMergeLoRA(StrategyDefaults, LayerHooks):
    """Drive per-task LoRA merging over every LoRALinear of ``model`` (see the module docstring); a
    ``mbf.strategies`` strategy.

    Args:
        model: a model with LoRA layers (``mbf.inject``); their current adapters are the shared start.
        config: the merge (default ``TaskMergeConfig()``: TIES, k = 20%, λ = 1); keyword options
            override its fields.

    Raises:
        ValueError: an unknown option, or a model without LoRA layers.
    """

    strategy_name, config_class = "task-merge", TaskMergeConfig
    finetuned_differs = True  # the task's own LoRA alone vs the merge of every task so far

    def __init__(self, model: nn.Module, config: TaskMergeConfig | None = None, **options) -> None:
        self._take(model, config, options)
        with torch.no_grad():  # (r, in) and (out, r) per layer: where every task's LoRA starts
            self.start = [
                (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in self.layers.values()
            ]
        self.kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per task, per layer: (A_t, B_t)
        self.deltas: list[torch.Tensor] | None = None  # per layer: the merged ΔW (out, in), full variant
        self._handles = [
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers.values())
        ]
        for i, layer in enumerate(self.layers.values()):  # a fold of the merged adapter folds ΔW too
            layer.extra_term = ExtraTerm(self, ("merged",), lambda i=i: self._folded_delta(i))
        model.__dict__[MERGED_DELTAS] = self  # save_peft_adapter refuses the model while active()
        self._apply_eval_adapter()

    def active(self) -> bool:
        """True while a dense merged ΔW computes in the layers' merged mode (not the low-rank variant)."""
        return self.deltas is not None and bool(self._handles)

    def _folded_delta(self, i: int) -> torch.Tensor | None:
        """Layer ``i``'s merged ΔW ``(out, in)`` while its hook adds it in the merged mode, else None."""
        return self.deltas[i] if self.active() else None

    def _hook(self, i: int):
        def add_delta(layer, inputs, out):
            if self.deltas is None or layer.mode != "merged" or layer.disabled or layer.folded:
                return out
            delta = self.deltas[i]  # (out, in) fp32: the LoRA branch's compute dtype over any base
            return out + nn.functional.linear(inputs[0].to(delta.dtype), delta).to(out.dtype)

        return add_delta

    # -- task boundaries --------------------------------------------------------------------------

    @torch.no_grad()
    def begin_task(self) -> None:
        """Every layer's fine-tuned adapter back to the shared start; both factors train.

        Raises:
            RuntimeError: when the previous task was not ended.
        """
        self._check_task(opening=True)
        for layer, (A0, B0) in zip(self.layers.values(), self.start):
            layer.lora_A.copy_(A0)
            layer.lora_B.copy_(B0)
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        self.in_task = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every ``lora_A`` and ``lora_B``: the current task's LoRA."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def end_task(self) -> None:
        """Keep the task's factors and merge the task vectors of every task so far; ``task_index`` advances.

        Raises:
            RuntimeError: when no task was begun.
            ValueError: a layer's adapter or merged ΔW holds non-finite values (names the layer; nothing
                changes and the task stays open).
        """
        self._check_task(opening=False)
        factors = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in self.layers.values()]
        for name, (A, B) in zip(self.layers, factors):
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise ValueError(f"{name}: the task's adapter has non-finite values; refusing to merge")
        merged = self._merge([*self.kept, factors])
        self.kept.append(factors)
        self._install(merged)
        self.task_index += 1
        self.in_task = False
        self._apply_eval_adapter()

    def _merge(self, kept: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[torch.Tensor]:
        """Every layer's merged ΔW (out, in) from the kept factors (fp32; task vectors rebuilt per use)."""
        cfg, layers = self.config, list(self.layers.values())

        def vectors(li: int) -> list[torch.Tensor]:
            return [task_vector(*task[li], layers[li].scaling) for task in kept]

        thresholds = None
        if cfg.merge == "ties":  # each task's threshold over its whole task vector, one task at a time
            per_task = ((task_vector(A, B, m.scaling) for (A, B), m in zip(task, layers)) for task in kept)
            thresholds = ties_thresholds(per_task, cfg.density)
        merged = []
        for li, name in enumerate(self.layers):
            delta = merge_task_vectors(vectors(li), cfg.merge, lam=cfg.lam, thresholds=thresholds)
            if not torch.isfinite(delta).all():
                raise ValueError(f"{name}: the {cfg.merge} merge has non-finite values; refusing to merge")
            merged.append(delta)
        return merged

    def _install(self, merged: list[torch.Tensor]) -> None:
        """The merged ΔW of every layer as the frozen delta (full) or as its merged adapter (low rank)."""
        if not self.config.low_rank:
            self.deltas = merged
            return
        for layer, delta in zip(self.layers.values(), merged):
            A, B = low_rank_factors(delta, layer.r, layer.scaling)
            layer.merged_A.copy_(A)
            layer.merged_B.copy_(B)

    # -- evaluation -------------------------------------------------------------------------------

    def _apply_eval_adapter(self) -> None:
        for layer in self.layers.values():  # the merge once a task has been merged, before it the LoRA
            layer.eval_adapter_mode = "merged" if self.task_index else None

    @contextmanager
    def adapter_mode(self, mode: str) -> Iterator[nn.Module]:
        """Run the model with ``"merged"`` (the merge of tasks so far: ``merged()``, what inference uses) or
        ``"finetuned"`` (the current task's LoRA alone), in training and eval() alike.

        Raises:
            ValueError: another mode (``"preview"`` is SLAO's), or a layer with an adapter folded in.
        """
        if mode not in ("merged", "finetuned"):
            raise ValueError(f"TaskMergeLoRA.adapter_mode: {mode!r} must be 'merged' or 'finetuned'")
        with use_adapter(self.layers.values(), mode, 1.0):
            yield self.model

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The shared start, the current LoRA and every kept task's factors (the merge is recomputed)."""
        tensors = {}
        for li, (name, layer) in enumerate(self.layers.items()):
            tensors[f"{name}.start_A"], tensors[f"{name}.start_B"] = self.start[li]
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = (
                layer.lora_A.detach(),
                layer.lora_B.detach(),
            )
            for t, task in enumerate(self.kept, start=1):
                tensors[f"{name}.task{t:03d}_A"], tensors[f"{name}.task{t:03d}_B"] = task[li]
        return {"task_index": self.task_index, "in_task": self.in_task, "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``: every tensor is checked before any is copied (all or nothing).

        Raises:
            KeyError: a tensor is missing, or the state has one this model lacks (named).
            ValueError: a shape differs from the layer's (named).
        """
        tensors, n = state["tensors"], int(state["task_index"])
        want = {}
        for name, layer in self.layers.items():
            shapes = {"A": tuple(layer.lora_A.shape), "B": tuple(layer.lora_B.shape)}
            keys = ["start", "lora", *[f"task{t:03d}" for t in range(1, n + 1)]]
            want.update({f"{name}.{k}_{f}": shapes[f] for k in keys for f in "AB"})
        for key, shape in want.items():
            if key not in tensors:
                raise KeyError(f"{key}: missing from the saved state")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} != {shape}")
        extra = sorted(set(tensors) - set(want))
        if extra:
            raise KeyError(f"{extra[0]}: in the saved state but not a tensor of this model's task merge")
        names = list(self.layers)

        def get(li: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(tensors[f"{names[li]}.{key}_{f}"].clone() for f in "AB")

        self.start = [get(li, "start") for li in range(len(names))]
        self.kept = [[get(li, f"task{t:03d}") for li in range(len(names))] for t in range(1, n + 1)]
        for li, layer in enumerate(self.layers.values()):
            A, B = get(li, "lora")
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        self.deltas = None
        if self.kept:
            self._install(self._merge(self.kept))
        self.task_index, self.in_task = n, bool(state.get("in_task", False))
        self._apply_eval_adapter()

    def adapter_bytes(self) -> int:
        """Bytes of adapter state held: the shared start, the current LoRA, every kept task's factors
        (growing with T) and the merge (the dense deltas, or the merged adapters of the low-rank variant)."""
        held = [t for pair in self.start for t in pair] + self.trainable_parameters()
        held += [t for task in self.kept for pair in task for t in pair]
        if self.config.low_rank:
            held += [b for layer in self.layers.values() for b in (layer.merged_A, layer.merged_B)]
        else:
            held += self.deltas or []
        return sum(t.numel() * t.element_size() for t in held)

    def save(self, path: str | Path) -> Path:
        """Write the state into directory ``path`` (``mbf.checkpoint``'s format: crash-safe, checksummed;
        inside a task too: the current LoRA is saved)."""
        return write_strategy(self, path, self.state_dict()["tensors"])

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, *, config: Any = None) -> TaskMergeLoRA:
        """Rebuild from ``save(path)`` (``mbf.strategies.saving.read_strategy``: all or nothing); the merge
        is recomputed from the kept factors. ``config``: the method from now on (None: the saved one).

        Raises:
            FileNotFoundError, ValueError, KeyError: a missing, malformed, corrupted or mismatched
                checkpoint (the message names the file, field or tensor).
        """
        return read_strategy(cls, model, path, config)

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        self.load_state_dict(
            {"task_index": ckpt.task_index, "in_task": ckpt.in_task, "tensors": ckpt.tensors}
        )

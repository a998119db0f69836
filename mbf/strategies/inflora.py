"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free
Low-Rank Adaptation for Continual Learning", arXiv:2404.00228).

The paper writes a task's branch ``ΔW_t = A_t B_t`` with ``B_t ∈ R^{r×d_in}`` the *designed*, frozen
dimensionality-reduction matrix and ``A_t ∈ R^{d_out×r}`` the trained one (zero at the start); in this
package's (PEFT's) names that is ``B_t A_t`` with our ``lora_A`` ``(r, in)`` designed and frozen and our
``lora_B`` ``(out, r)`` trained. For task ``t``, before training (the paper's Section 3):

    Ĥ_t = H_t − M_t M_tᵀ H_t          (the task's inputs off the protected subspace; DualGPM "remove")
    Ĥ_t = M_t M_tᵀ H_t                (when M_t stores the unprotected subspace instead: "retain")
    A_t = (top-r left singular vectors of Ĥ_t)ᵀ / √3

so that ``ΔW_t = B_t A_t`` moves W only along input directions that no earlier task's inputs (hence its
gradients, which lie in the span of its inputs) occupy. After training, the memory ``M`` is updated with
the task's inputs by DualGPM's rule with the explained-energy threshold ``ε`` (``mbf.closed_form``'s
``inflora_design`` and ``dualgpm_update``, in fp32 here; the tests check them in float64 by hand). ``H_t``
enters only as its covariance ``C = Σ x xᵀ / n`` over every token of the task's training sequences,
collected by ``observe_inputs`` (the loop calls it before ``begin_task`` and again before ``end_task``, as
the paper's code collects the inputs before training and after it).

Past branches are kept as the paper's code keeps them: one frozen ``(A_k, B_k)`` per task and layer, summed
at inference and training (``mbf.strategies.branches``; memory grows with T, plus the memory bases ``M``, at
most ``in/2`` columns per layer; layers reading the same input, q_proj and v_proj, get the same basis, which
a checkpoint stores, and ``adapter_bytes`` counts, once). Differences from the released code, for the
paper's equations: the energy criterion uses the eigenvalues of ``C`` (``σ²`` of ``H``, the paper's
Frobenius norms) where the code takes the singular values of the covariance (``σ⁴``), the design takes the
eigenvectors of ``P C P`` (``Ĥ Ĥᵀ``) where the code takes the left singular vectors of ``P C``, and the
first task keeps the fewest directions reaching ``ε`` (the code one fewer). ``ε`` is one constant (default
0.95, the code's CIFAR-100 start value) unless ``threshold_end`` and ``tasks`` set the released code's ramp,
``ε_t = threshold + (threshold_end − threshold) · t / T`` for 0-based task ``t`` (its configs raise ε from
0.95 towards 1.0 over the task sequence, which needs the number of tasks T up front: ``--option
threshold_end=1.0 --option tasks=4``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbf.closed_form import dualgpm_update, inflora_design
from mbf.strategies.base import StrategyConfig
from mbf.strategies.branches import BranchStrategy

__all__ = ["InfLoRA", "InfLoRAConfig"]

KINDS = ("remove", "retain")  # DualGPM: memory spans the protected subspace, or its complement


def same_as_first(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: the first name whose tensor is bit-equal to its own}`` (itself when none before it is): the
    layers that read the same input (q_proj and v_proj) and so hold the same covariance, basis or sketch."""
    first: dict[str, str] = {}
    leaders: list[str] = []
    for name, t in tensors.items():
        same = (k for k in leaders if tensors[k].shape == t.shape and torch.equal(tensors[k], t))
        first[name] = next(same, name)
        if first[name] == name:
            leaders.append(name)
    return first


@dataclass(frozen=True)
class InfLoRAConfig(StrategyConfig):
    """InfLoRA's options."""

    threshold: float = 0.95  # ε: the share of each task's input energy its protected subspace must hold
    threshold_end: float = 0.0  # > 0: ε ramps from threshold towards it over ``tasks`` (the released code)
    tasks: int = 0  # the number of tasks T of the ramp (needed with threshold_end)

    def __post_init__(self) -> None:
        v = self.threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < 1):
            raise ValueError(f"InfLoRAConfig: threshold={v!r} must be in (0, 1)")
        object.__setattr__(self, "threshold", float(v))
        end, tasks = self.threshold_end, self.tasks
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not (end == 0 or v <= end <= 1):
            raise ValueError(f"InfLoRAConfig: threshold_end={end!r} must be 0 (no ramp) or in [threshold, 1]")
        object.__setattr__(self, "threshold_end", float(end))
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0 or (end > 0) != (tasks > 0):
            raise ValueError(
                f"InfLoRAConfig: tasks={tasks!r} must be the number of tasks (>= 1) exactly when "
                "threshold_end is set"
            )

    def epsilon(self, task_index: int) -> float:
        """ε for the memory update after task ``task_index + 1`` (0-based ``task_index``, the released
        code's ``_cur_task``): ``threshold + (threshold_end − threshold) · task_index / tasks`` with a
        ramp, else ``threshold``; it stays below 1 over the ``tasks`` tasks."""
        if not self.tasks:
            return self.threshold
        step = min(task_index, self.tasks - 1) / self.tasks
        return self.threshold + (self.threshold_end - self.threshold) * step


class InfLoRA(BranchStrategy):
    """InfLoRA over a model's LoRA layers (see the module docstring for the equations).

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: ``InfLoRAConfig`` (default ε = 0.95); keyword options override its fields.
    """

    strategy_name, config_class, trained = "inflora", InfLoRAConfig, "B"
    wants_inputs = True

    def __init__(self, model, config: InfLoRAConfig | None = None, **options) -> None:
        super().__init__(model, config, **options)
        first = next(iter(self.layers.values())).lora_A
        self.memory = {n: first.new_zeros(layer.in_features, 0) for n, layer in self.layers.items()}
        self.kind = dict.fromkeys(self.layers, "remove")
        self._cov: dict[str, torch.Tensor] | None = None  # the last observe_inputs(), until used

    @torch.no_grad()
    def observe_inputs(self, forward: Callable[[], None]) -> None:
        """Collect every layer's input covariance ``Σ x xᵀ / n`` (fp32, over all tokens) while ``forward()``
        runs the model over the task's training inputs; ``begin_task`` / ``end_task`` use it.

        Raises:
            ValueError: ``forward()`` ran no adapted layer.
        """
        sums = {n: torch.zeros(layer.in_features, layer.in_features, device=layer.lora_A.device)
                for n, layer in self.layers.items()}  # fmt: skip
        counts = dict.fromkeys(self.layers, 0)

        def watch(name, layer, args):
            x = args[0].detach().reshape(-1, layer.in_features).float()  # (tokens, in)
            sums[name] += x.T @ x
            counts[name] += x.shape[0]

        handles = [
            m.register_forward_pre_hook(lambda m, a, n=n: watch(n, m, a)) for n, m in self.layers.items()
        ]
        try:
            forward()
        finally:
            for handle in handles:
                handle.remove()
        unseen = [n for n, c in counts.items() if c == 0]
        if unseen:
            raise ValueError(
                f"InfLoRA.observe_inputs: {unseen[0]} saw no input; forward() must run the model"
            )
        self._cov = {n: sums[n] / counts[n] for n in self.layers}

    def _take_inputs(self, op: str) -> dict[str, torch.Tensor]:
        if self._cov is None:
            raise RuntimeError(
                f"InfLoRA.{op}: call observe_inputs(forward) with the task's training inputs first"
            )
        cov, self._cov = self._cov, None
        return cov

    def _init_task(self) -> None:
        """A designed from the task's inputs off the protected subspace (frozen); B zero (trained)."""
        cov = self._take_inputs("begin_task")
        for name, layer in self.layers.items():
            A = inflora_design(cov[name], self.memory[name], self.kind[name], layer.r)
            layer.lora_A.copy_(A)
            layer.lora_B.zero_()

    @torch.no_grad()
    def _before_end(self) -> None:
        """DualGPM: the memory takes the task's input subspace (threshold ε)."""
        cov = self._take_inputs("end_task")
        for name in self.layers:
            self.memory[name], self.kind[name] = dualgpm_update(
                cov[name], self.memory[name], self.kind[name], self.config.epsilon(self.task_index)
            )

    def end_task(self) -> None:
        """Update the memory with the task's inputs (``observe_inputs`` after training), then freeze the
        task's LoRA into the past branches; ``task_index`` advances.

        Raises:
            RuntimeError: no task begun, or the inputs were not observed after training.
            ValueError: a non-finite adapter (names the layer; the task stays open).
        """
        if self.in_task and self._cov is None:  # before anything changes: the task stays open
            self._take_inputs("end_task")
        super().end_task()

    # -- state: the memory bases and their kinds --------------------------------------------------

    def _shared_memory(self) -> dict[str, str]:
        """Layers whose memory is bit-equal to an earlier layer's (q_proj and v_proj read the same input, so
        DualGPM gives them the same basis): ``{layer: the earlier layer}``, stored and counted once."""
        first = same_as_first({n: m for n, m in self.memory.items() if m.shape[1]})
        return {n: lead for n, lead in first.items() if lead != n}

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        shared = self._shared_memory()
        return {f"{n}.memory": m for n, m in self.memory.items() if m.shape[1] and n not in shared}

    def _extra_state(self) -> dict:
        return {"memory_kind": dict(self.kind), "memory_shared": self._shared_memory()}

    def _load_extra(self, tensors: dict[str, torch.Tensor], state: dict | None) -> None:
        kinds = (state or {}).get("memory_kind")
        if not isinstance(kinds, dict) or set(kinds) != set(self.layers):
            raise ValueError(f"strategy_state.memory_kind={kinds!r} must name every LoRA layer of the model")
        shared = (state or {}).get("memory_shared") or {}  # (absent from checkpoints before issue 42)
        if (
            not isinstance(shared, dict)
            or not set(shared) | set(shared.values()) <= set(self.layers)
            or any(
                lead in shared or f"{n}.memory" in tensors or f"{lead}.memory" not in tensors
                for n, lead in shared.items()
            )
        ):
            raise ValueError(
                f"strategy_state.memory_shared={shared!r} must map layers without a saved memory to layers "
                "with one"
            )
        memory = {}
        for name, layer in self.layers.items():
            if kinds[name] not in KINDS:
                raise ValueError(f"{name}: memory kind {kinds[name]!r} must be one of {', '.join(KINDS)}")
            saved = tensors.get(f"{shared.get(name, name)}.memory")
            if saved is None:
                saved = layer.lora_A.new_zeros(layer.in_features, 0)
            if saved.dim() != 2 or saved.shape[0] != layer.in_features or saved.shape[1] > layer.in_features:
                raise ValueError(
                    f"{name}.memory: saved shape {tuple(saved.shape)} is not ({layer.in_features}, k)"
                )
            memory[name] = saved.to(layer.lora_A.device, layer.lora_A.dtype)
        unexpected = sorted(set(tensors) - {f"{n}.memory" for n in self.layers})
        if unexpected:
            raise KeyError(f"{unexpected[0]}: in the saved state but not a tensor of InfLoRA")
        self.memory, self.kind = memory, dict(kinds)

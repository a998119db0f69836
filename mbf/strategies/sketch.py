"""Sketch-merge: InfLoRA's interference-free design in a fixed budget, one merged adapter for all past tasks.

This package's own extension (not a paper's method): InfLoRA (Liang & Li, CVPR 2024) protects past tasks by
designing each new task's ``A`` in the complement of their input subspace, but keeps one LoRA per task and
a memory that grows with the tasks; SLAO keeps one adapter but lets every task overwrite the last. Here a
layer holds, whatever the number of tasks ``T``:

- the current task's LoRA ``(A_t, B_t)`` (rank r; ``A_t`` designed and frozen, ``B_t`` trained);
- one merged past adapter ``(P_A, P_B)`` of rank at most ``R`` (``rank``; ``ΔW_past = s P_B P_A``);
- a sketch of every past input ``(M, e, τ)``: ``k`` orthonormal directions ``M`` ``(in, k)`` (``sketch``),
  their energies ``e`` ``(k,)`` and the total energy ``τ`` (one scalar); layers that read the same input
  (q_proj and v_proj) share one sketch.

For task ``t``, with ``C_t = Σ x xᵀ / n`` its layer input covariance (``observe_inputs``, as InfLoRA):

    A_t = (top-r eigenvectors of P C_t P)ᵀ / √3,  P = I − M Mᵀ      (InfLoRA's design, bounded memory)
    B_t = 0, trained; the layer computes W0 x + s B_t A_t x + s P_B P_A x

At the end of the task (after ``observe_inputs`` again):

    sketch:   S = M diag(e) Mᵀ + C_t,  (M, e) ← top-k eigenpairs of S,  τ ← τ + tr C_t
    weight:   G = M diag(√e) Mᵀ + √δ (I − M Mᵀ),  δ = (τ − Σ e) / (in − k)   (the discarded energy, spread)
    merge:    D = P_B P_A + λ(t) B_t A_t                                  (λ: ``schedule``, SLAO's λ(t))
              U Σ Vᵀ = D G (thin SVD),  P_B ← U_R Σ_R^½,  P_A ← Σ_R^½ V_Rᵀ G⁻¹

so the merged adapter is the rank-R ``D̂`` minimising ``‖(D − D̂) G‖_F``, i.e. ``Σ_tasks ‖(D − D̂) x‖²``
over the inputs the sketch remembers (an activation-weighted truncation): what is dropped is what past
inputs barely excite. ``schedule="none"`` (λ ≡ 1, the default) adds each task in full, as InfLoRA's sum of
branches does; ``"sqrt"`` is SLAO's time-aware scaling of the new task's update. ``mbf.reference``'s
``sketch_update``, ``sketch_weight`` and ``bounded_merge`` are the float64 spec (tests only); this module
computes the same in one batched ``eigh`` / ``svd`` over all layers (float64 inside, fp32 stored).

State after any task (fp32): per layer ``(R + r)(in + out)`` adapter elements, AdamW's two moments of
``B_t`` only, and per distinct input ``k·in + k + 1`` sketch elements: constant in ``T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mbf.closed_form import SCHEDULES, inflora_design, lam_schedule
from mbf.strategies.base import StrategyConfig
from mbf.strategies.branches import FrozenBranches
from mbf.strategies.inflora import InfLoRA, same_as_first

__all__ = ["SketchMerge", "SketchMergeConfig"]

F64 = torch.float64


@dataclass(frozen=True)
class SketchMergeConfig(StrategyConfig):
    """Sketch-merge's budget and merge (results.json records it as ``"options"``)."""

    rank: int = 16  # R: the merged past adapter's rank, per layer
    sketch: int = 30  # k: input directions remembered, per distinct layer input (q and v share theirs)
    schedule: str = "none"  # λ(t) on the new task's update when merged: none (1), sqrt (SLAO's 1/√t), ...
    weighted: bool = True  # truncate by past inputs (‖(D − D̂) G‖); False: plain SVD (‖D − D̂‖)

    def __post_init__(self) -> None:
        for name in ("rank", "sketch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SketchMergeConfig: {name}={v!r} must be an integer >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"SketchMergeConfig: schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if not isinstance(self.weighted, bool):
            raise ValueError(f"SketchMergeConfig: weighted={self.weighted!r} must be true or false")


class _MergedPast(FrozenBranches):
    """``FrozenBranches`` holding one merged adapter of rank ≤ R per layer instead of one LoRA per task."""

    def __init__(self, model, layers, merge) -> None:
        super().__init__(model, layers)
        self.merge = merge  # {name: (A, B)} of the merged adapters, computed for all layers at once

    @torch.no_grad()
    def push(self) -> None:
        for name, (A, B) in self.merge().items():
            self.A[name], self.B[name] = A, B
            self.layers[name].lora_B.zero_()

    def load(self, tensors: dict[str, torch.Tensor], tasks: int) -> None:
        loaded = {}
        for name, layer in self.layers.items():
            A, B = tensors.get(f"{name}.past_A"), tensors.get(f"{name}.past_B")
            if tasks == 0 or A is None:
                if tasks and A is None:
                    raise KeyError(f"{name}.past_A: missing from the saved state ({tasks} finished tasks)")
                continue
            if B is None:
                raise KeyError(f"{name}.past_B: missing from the saved state ({tasks} finished tasks)")
            k = A.shape[0]
            if A.shape != (k, layer.in_features) or B.shape != (layer.out_features, k):
                raise ValueError(f"{name}.past_A/past_B: saved shapes {tuple(A.shape)}, {tuple(B.shape)} "
                                 f"are not (k, {layer.in_features}), ({layer.out_features}, k)")  # fmt: skip
            loaded[name] = (
                A.to(layer.lora_A.device, layer.lora_A.dtype),
                B.to(layer.lora_A.device, layer.lora_A.dtype),
            )
        unexpected = sorted(k for k in tensors if k.rpartition(".")[0] not in loaded)
        if unexpected:
            raise KeyError(f"{unexpected[0]}: in the saved state but not a merged adapter of this model")
        for name in self.layers:
            self.A[name], self.B[name] = loaded.get(name, (None, None))


class SketchMerge(InfLoRA):
    """Sketch-merge over a model's LoRA layers (see the module docstring for the equations).

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: ``SketchMergeConfig`` (default R = 16, k = 30, λ ≡ 1, weighted); keyword options override it.
    """

    strategy_name, config_class, trained = "sketch-merge", SketchMergeConfig, "B"

    def __init__(self, model, config: SketchMergeConfig | None = None, **options) -> None:
        super().__init__(model, config, **options)
        for name, layer in self.layers.items():
            if self.config.rank > min(layer.in_features, layer.out_features):
                raise ValueError(f"{name}: rank={self.config.rank} exceeds min(in, out) = "
                                 f"{min(layer.in_features, layer.out_features)}")  # fmt: skip
            if self.config.sketch >= layer.in_features:
                raise ValueError(
                    f"{name}: sketch={self.config.sketch} must be < in_features={layer.in_features}"
                )
        self.branches = _MergedPast(model, self.layers, self._merge)
        self.group: dict[str, str] | None = None  # layer → the first layer reading the same input
        first = next(iter(self.layers.values())).lora_A
        self.memory = {n: first.new_zeros(layer.in_features, 0) for n, layer in self.layers.items()}
        self.energy = {n: first.new_zeros(0) for n in self.layers}
        self.total = dict.fromkeys(self.layers, 0.0)

    def _leaders(self) -> list[str]:
        return [n for n in self.layers if self.group is None or self.group[n] == n]

    def _init_task(self) -> None:
        """A designed in the complement of the sketch (InfLoRA's design, frozen), once per shared input."""
        cov = self._take_inputs("begin_task")
        if self.group is None:
            self.group = same_as_first(cov)  # bit-equal covariances: one input, one sketch
        designed: dict[tuple[str, int], torch.Tensor] = {}
        for name, layer in self.layers.items():
            lead = self.group[name]
            if (lead, layer.r) not in designed:
                designed[lead, layer.r] = inflora_design(cov[lead], self.memory[lead], "remove", layer.r)
            layer.lora_A.copy_(designed[lead, layer.r])
            layer.lora_B.zero_()

    @torch.no_grad()
    def _before_end(self) -> None:
        """The sketch takes the task's inputs (top-k of S), for every distinct input in one batched eigh."""
        cov = self._take_inputs("end_task")
        k = self.config.sketch
        for names in _by_shape(self._leaders(), lambda n: cov[n].shape[0]):
            S = torch.stack([_summary(self.memory[n], self.energy[n]) + cov[n].to(F64) for n in names])
            vals, vecs = torch.linalg.eigh(S)  # ascending, (G, in), (G, in, in)
            vals, vecs = vals.flip(-1)[:, :k].clamp(min=0), vecs.flip(-1)[:, :, :k]
            for j, n in enumerate(names):
                keep = int((vals[j] > 0).sum())
                self.memory[n] = vecs[j, :, :keep].to(self.memory[n].dtype)
                self.energy[n] = vals[j, :keep].to(self.memory[n].dtype)
                self.total[n] += float(torch.trace(cov[n].to(F64)))
        for n, lead in (self.group or {}).items():  # the layers that share it see the same tensors
            self.memory[n], self.energy[n] = self.memory[lead], self.energy[lead]
            self.total[n] = self.total[lead]

    def _merge(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's new merged adapter: ``P_B P_A + λ B_t A_t`` truncated to rank R in the sketch's
        norm, one batched SVD per shape."""
        lam = lam_schedule(self.config.schedule, self.task_index + 1)
        out = {}
        for names in _by_shape(
            list(self.layers), lambda n: (self.layers[n].out_features, self.layers[n].in_features)
        ):
            D, G, Ginv = [], [], []
            for n in names:
                layer, lead = self.layers[n], (self.group or {}).get(n, n)
                new = lam * layer.lora_B.detach().to(F64) @ layer.lora_A.detach().to(F64)
                past = self.branches.B[n], self.branches.A[n]
                D.append(new if past[0] is None else new + past[0].to(F64) @ past[1].to(F64))
                g, gi = _weights(self.memory[lead], self.energy[lead], self.total[lead], self.config.weighted)
                G.append(g)
                Ginv.append(gi)
            D, G, Ginv = torch.stack(D), torch.stack(G), torch.stack(Ginv)
            U, S, Vh = torch.linalg.svd(D @ G, full_matrices=False)
            for j, n in enumerate(names):
                keep = min(self.config.rank, int((S[j] > S[j, 0] * 1e-10).sum()))
                root = S[j, :keep].sqrt()
                dtype = self.layers[n].lora_A.dtype
                B = (U[j, :, :keep] * root).to(dtype)  # (out, k)
                A = ((root[:, None] * Vh[j, :keep]) @ Ginv[j]).to(dtype)  # (k, in)
                out[n] = (A, B)
        return out

    # -- state: the sketches, their energies and totals, and which layers share them ---------------

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self._leaders():
            if self.memory[n].shape[1]:
                out[f"{n}.memory"], out[f"{n}.energy"] = self.memory[n], self.energy[n]
                out[f"{n}.total"] = torch.tensor([self.total[n]], dtype=self.memory[n].dtype)
        return out

    def _extra_state(self) -> dict:
        return {"group": dict(self.group) if self.group is not None else None}

    def _load_extra(self, tensors: dict[str, torch.Tensor], state: dict | None) -> None:
        group = (state or {}).get("group")
        if group is not None and (not isinstance(group, dict) or set(group) != set(self.layers)
                                  or not set(group.values()) <= set(self.layers)):  # fmt: skip
            raise ValueError(f"strategy_state.group={group!r} must map every LoRA layer to one of them")
        leaders = [n for n in self.layers if group is None or group[n] == n]
        memory, energy, total = {}, {}, {}
        first = next(iter(self.layers.values())).lora_A
        for n in leaders:
            M, e, tau = (tensors.get(f"{n}.{key}") for key in ("memory", "energy", "total"))
            layer = self.layers[n]
            if M is None:
                M, e, tau = first.new_zeros(layer.in_features, 0), first.new_zeros(0), first.new_zeros(1)
            if M.dim() != 2 or M.shape[0] != layer.in_features or M.shape[1] > self.config.sketch:
                raise ValueError(f"{n}.memory: saved shape {tuple(M.shape)} is not ({layer.in_features}, "
                                 f"k <= {self.config.sketch})")  # fmt: skip
            if e is None or e.shape != (M.shape[1],) or tau is None or tau.shape != (1,):
                raise ValueError(f"{n}.energy/total: missing or not of shape ({M.shape[1]},) / (1,)")
            memory[n], energy[n], total[n] = M.to(first), e.to(first), float(tau[0])
        known = {f"{n}.{key}" for n in leaders for key in ("memory", "energy", "total")}
        unexpected = sorted(set(tensors) - known)
        if unexpected:
            raise KeyError(f"{unexpected[0]}: in the saved state but not a tensor of sketch-merge")
        for n in self.layers:
            lead = n if group is None else group[n]
            self.memory[n], self.energy[n], self.total[n] = memory[lead], energy[lead], total[lead]
        self.group = group


def _by_shape(names: list[str], key) -> list[list[str]]:
    """``names`` grouped by ``key(name)``, in first-seen order (one batched call per group)."""
    groups: dict = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return list(groups.values())


def _summary(memory: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``M diag(e) Mᵀ`` in float64: the sketch as a covariance."""
    M = memory.to(F64)
    return (M * energy.to(F64)) @ M.T


def _weights(memory: torch.Tensor, energy: torch.Tensor, total: float, weighted: bool):
    """``G = M diag(√e) Mᵀ + √δ (I − M Mᵀ)`` and its inverse (float64); identity when not ``weighted`` or
    before any input was seen."""
    n, k = memory.shape
    eye = torch.eye(n, dtype=F64, device=memory.device)
    if not weighted or k == 0 or total <= 0:
        return eye, eye
    M, e = memory.to(F64), energy.to(F64)
    floor = max((total - float(e.sum())) / (n - k), float(e[0]) * 1e-6, 1e-30)  # δ > 0: G invertible
    inside, root = M @ M.T, e.clamp(min=floor).sqrt()
    G = (M * root) @ M.T + math.sqrt(floor) * (eye - inside)
    Ginv = (M / root) @ M.T + (eye - inside) / math.sqrt(floor)
    return G, Ginv

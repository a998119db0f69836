"""O-LoRA: orthogonal subspace learning (Wang et al., 2023, "Orthogonal Subspace Learning for Language
Model Continual Learning", EMNLP Findings, arXiv:2310.14152).

Each task ``t`` trains a new LoRA ``(A_t, B_t)`` (the usual init: A Kaiming-uniform, B zero); the past
tasks' LoRAs stay frozen and are summed with it in training and inference,
``W = W0 + s Σ_{i≤t} B_i A_i`` (``mbf.strategies.branches``: memory ``O(T·(in + out)·r)`` per layer).
The loss of task ``t`` is

    L = L_task + λ₁ Σ_layers Σ_{i<t} L_orth(A_i, A_t) + λ₂ ‖θ_t‖²

with the paper's overlap ``O_{i,t} = A_iᵀ A_t`` of its column-basis factors (its ``A`` is ``(in, r)``,
ours ``(r, in)``: here ``O_{i,t} = A_i A_tᵀ``, ``(r, r)``), ``L_orth = Σ_{j,k} O_{i,t}[j, k]²`` (zero
when every past row space is orthogonal to the new one) and ``θ_t = {A_t, B_t}``. All past ``A_i`` of
a layer are one stacked ``(T·r, in)`` tensor, so ``Σ_i L_orth`` is one ``(T·r, r)`` product per layer.

``norm="code"`` computes the two terms as the authors' released code does instead: ``Σ |O[j, k]|`` (an
L1 overlap) and ``Σ_{θ∈θ_t} ‖θ‖_F`` (unsquared norms). Defaults ``λ₁ = 0.5``, ``λ₂ = 0`` are the released
scripts' (the paper tunes λ₁ on a validation split; with λ₂ = 0 the L2 term is off); the ``norm``
default is the paper's equations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mbf.strategies.base import StrategyConfig
from mbf.strategies.branches import BranchStrategy

__all__ = ["NORMS", "OLoRA", "OLoRAConfig", "orthogonality_loss"]

NORMS = ("paper", "code")  # the terms squared (the paper's equations) or as the released code computes them


@dataclass(frozen=True)
class OLoRAConfig(StrategyConfig):
    """O-LoRA's options (defaults: the paper's released scripts)."""

    lambda_orth: float = 0.5  # λ₁: weight of the orthogonality loss between the new A and every past A
    lambda_l2: float = 0.0  # λ₂: weight of the L2 term on the new LoRA
    norm: str = "paper"  # "paper": squared terms (its equations); "code": Σ|O| and unsquared ‖θ‖ (its code)

    def __post_init__(self) -> None:
        for name in ("lambda_orth", "lambda_l2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"OLoRAConfig: {name}={v!r} must be a finite number >= 0")
            object.__setattr__(self, name, float(v))
        if self.norm not in NORMS:
            raise ValueError(f"OLoRAConfig: norm={self.norm!r} must be one of {', '.join(NORMS)}")


def orthogonality_loss(past_A: torch.Tensor, A: torch.Tensor, norm: str = "paper") -> torch.Tensor:
    """``Σ_i L_orth(A_i, A)`` for the past A's stacked ``(T·r, in)`` and the new ``A`` ``(r, in)``.

    ``"paper"``: ``Σ (past_A Aᵀ)²``; ``"code"``: ``Σ |past_A Aᵀ|``. A 0-d tensor in A's dtype.
    """
    overlap = past_A @ A.T  # (T·r, r): O_{i,t} for every past task i, stacked
    return overlap.square().sum() if norm == "paper" else overlap.abs().sum()


class OLoRA(BranchStrategy):
    """O-LoRA over a model's LoRA layers (see the module docstring for the equations).

    Args:
        model: a model with LoRA layers (``mbf.inject``).
        config: ``OLoRAConfig`` (default: λ₁ 0.5, λ₂ 0, the paper's squared terms); keyword options
            override its fields.
    """

    strategy_name, config_class, trained = "o-lora", OLoRAConfig, "AB"

    def loss_term(self) -> torch.Tensor | None:
        """``λ₁ Σ_layers Σ_{i<t} L_orth(A_i, A_t) + λ₂ Σ_layers ‖θ_t‖²`` (None outside a task, or when
        both terms are off: λ₂ = 0 in task 1)."""
        cfg = self.config
        if not self.in_task or not (cfg.lambda_l2 or (cfg.lambda_orth and self.task_index)):
            return None
        total = None
        for name, layer in self.layers.items():
            term = 0.0
            past = self.branches.A[name]
            if cfg.lambda_orth and past is not None:
                term = term + cfg.lambda_orth * orthogonality_loss(past, layer.lora_A, cfg.norm)
            if cfg.lambda_l2:
                sq = cfg.norm == "paper"
                norms = [t.square().sum() if sq else t.norm() for t in (layer.lora_A, layer.lora_B)]
                term = term + cfg.lambda_l2 * (norms[0] + norms[1])
            total = term if total is None else total + term
        return total

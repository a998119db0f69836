"""User configuration: frozen dataclasses, validated on construction, one comment per field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mbf.reference import SCHEDULES

__all__ = [
    "BACKENDS",
    "INITS",
    "LLAMA_LINEARS",
    "SCHEDULES",
    "ContinualConfig",
    "LoRAConfig",
    "check_lora_hyperparameters",
]

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("orthogonal", "last_merge", "random", "none")  # how task i ≥ 2's fine-tuned adapter starts
BACKENDS = ("auto", "torch", "triton")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_lora_hyperparameters(
    where: str, r, alpha, dropout, backend: str, max_rank: int | None = None
) -> None:
    """The one validation of LoRA's hyperparameters, for ``LoRAConfig`` and ``LoRALinear`` alike.

    Args:
        where: what to start the message with (a layer name, or ``"LoRAConfig"``).
        max_rank: ``min(in, out)`` of the layer, when known.

    Raises:
        ValueError: naming ``where`` and the offending value.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or (max_rank is not None and r > max_rank):
        bound = f"[1, {max_rank}]" if max_rank is not None else "[1, ∞)"
        raise ValueError(f"{where}: rank {r!r} must be an integer in {bound}")
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{where}: alpha={alpha!r} must be a finite number > 0")
    if not (_is_number(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"{where}: dropout {dropout!r} must be in [0, 1)")
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r} must be one of {', '.join(map(repr, BACKENDS))}")


@dataclass(frozen=True)
class LoRAConfig:
    """How to adapt a model's linears with LoRA."""

    r: int = 8  # rank of the adapter
    alpha: float = 16.0  # scaling = alpha / r, as in PEFT's lora_alpha
    dropout: float = 0.0  # LoRA dropout on the adapter branch's input (training only)
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # leaf names, or "all-linear"
    quantize: str | None = None  # "nf4" to store dense base weights in 4 bits (QLoRA)
    backend: str = "auto"  # "auto" (Triton on CUDA), "torch" or "triton"

    def __post_init__(self) -> None:
        check_lora_hyperparameters("LoRAConfig", self.r, self.alpha, self.dropout, self.backend)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("LoRAConfig: target_modules is empty")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"LoRAConfig: quantize={self.quantize!r} must be None or 'nf4'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self) -> tuple[str, ...]:
        """The leaf module names to adapt."""
        return LLAMA_LINEARS if self.target_modules == "all-linear" else self.target_modules  # type: ignore

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        """Inverse of ``to_dict``. Raises ValueError naming an unknown field."""
        data = dict(_known_fields(cls, data))
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


@dataclass(frozen=True)
class ContinualConfig:
    """How SLAO (or an ablation) moves from one task to the next. The defaults are SLAO."""

    schedule: str = "sqrt"  # λ(i) of the merge: "sqrt" 1/√i (SLAO), "inverse" 1/i, "constant", "none" (1)
    init: str = "orthogonal"  # task i ≥ 2 starts from: "orthogonal" (QR of the last A, SLAO),
    #   "last_merge" (same A, B from the merged B), "random" (fresh LoRA init), "none" (carried as is)
    constant: float = 0.5  # λ of the "constant" schedule, in (0, 1]
    orthogonal_updates: bool = False  # keep each task's A updates out of the previous task's row space

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"ContinualConfig: unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.init not in INITS:
            raise ValueError(f"ContinualConfig: unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        c = self.constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < c <= 1.0):
            # λ outside (0, 1] extrapolates past the fine-tuned adapter (or away from it)
            raise ValueError(f"ContinualConfig: constant λ={c!r} must be in (0, 1]")
        object.__setattr__(self, "constant", float(c))
        if not isinstance(self.orthogonal_updates, bool):
            raise ValueError(f"ContinualConfig: orthogonal_updates={self.orthogonal_updates!r} is not a bool")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ContinualConfig:
        """Inverse of ``to_dict``. Raises ValueError naming an unknown field."""
        return cls(**_known_fields(cls, data))


def _known_fields(cls, data: dict) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {known}")
    return data

"""User configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig: rank r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig: alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig: dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("LoRAConfig: target_modules is empty")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"LoRAConfig: quantize={self.quantize!r} must be None or 'nf4'")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"LoRAConfig: backend={self.backend!r} must be 'auto', 'torch' or 'triton'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self) -> tuple[str, ...]:
        """The leaf module names to adapt."""
        return LLAMA_LINEARS if self.target_modules == "all-linear" else self.target_modules  # type: ignore

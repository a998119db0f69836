"""User configuration of the adapters: a frozen dataclass, validated on construction, one comment per field.

A continual method's config lives beside its strategy (``mbf.strategies``): SLAO's ``ContinualConfig`` in
``mbf.strategies.slao`` (``mbf.config.ContinualConfig`` still finds it, with a DeprecationWarning).
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["BACKENDS", "LLAMA_LINEARS", "LoRAConfig", "check_lora_hyperparameters", "known_fields"]

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("auto", "torch", "triton", "hybrid")  # hybrid: base GEMMs in cuBLAS, low-rank parts in Triton


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


@dataclass(frozen=True, init=False)
class LoRAConfig:
    r"""How to adapt a model's linears with LoRA. PEFT's names (``lora_alpha``, ``lora_dropout``) and
    ``target_modules`` forms are accepted, with PEFT's matching rules:

    - a list/tuple of names: a module matches when its qualified name equals one of them or ends with
      ``"." + name`` (``"q_proj"``, ``"self_attn.q_proj"``);
    - a string: a regular expression that must match the whole qualified name
      (``r".*\.layers\.[0-3]\..*proj"``);
    - ``"all-linear"``: every linear module (dense or 4-bit) but the model's output embedding
      (``lm_head``), by module type, whatever the architecture.

    ``exclude_modules`` (same forms but "all-linear") removes matches. PEFT's ``task_type`` is accepted
    and ignored (it does not change LoRA's math). Defaults that differ from PEFT's ``LoraConfig``:
    ``alpha`` 16 (PEFT: 8, i.e. scaling 2 instead of 1 at r 8: the paper's and most LoRA recipes'
    setting); ``r`` 8, ``dropout`` 0 and, for a Llama, ``target_modules`` q_proj, v_proj are PEFT's too.
    """

    r: int = 8  # rank of the adapter
    alpha: float = 16.0  # scaling = alpha / r (PEFT: lora_alpha)
    dropout: float = 0.0  # LoRA dropout on the adapter branch's input, training only (PEFT: lora_dropout)
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")  # names/suffixes, a regex, or "all-linear"
    quantize: str | None = None  # "nf4" to store dense base weights in 4 bits (QLoRA)
    backend: str = "auto"  # "auto" (Triton on CUDA), "torch" or "triton"
    exclude_modules: tuple[str, ...] | str | None = None  # names/suffixes or a regex never adapted

    def __init__(
        self,
        r: int = 8,
        alpha: float | None = None,
        dropout: float | None = None,
        target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
        quantize: str | None = None,
        backend: str = "auto",
        exclude_modules: Sequence[str] | str | None = None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
        task_type: object = None,
        **unknown,
    ) -> None:
        # PEFT's task_type (CAUSAL_LM, ...) picks which PeftModel class wraps the model; the LoRA layers
        # compute the same whatever it is, so it is accepted and ignored (PEFT users write it by habit)
        if unknown:
            raise TypeError(
                f"LoRAConfig: unknown argument(s) {', '.join(sorted(unknown))} (PEFT options mbf does not "
                "implement are refused rather than ignored)"
            )
        values = {
            "r": r,
            "alpha": _one_name("alpha", alpha, "lora_alpha", lora_alpha, 16.0),
            "dropout": _one_name("dropout", dropout, "lora_dropout", lora_dropout, 0.0),
            "target_modules": _targets("target_modules", target_modules),
            "quantize": quantize,
            "backend": backend,
            "exclude_modules": _targets("exclude_modules", exclude_modules) if exclude_modules else None,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        check_lora_hyperparameters("LoRAConfig", self.r, self.alpha, self.dropout, self.backend)
        if self.exclude_modules == "all-linear":
            raise ValueError("LoRAConfig: exclude_modules='all-linear' would exclude every target")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"LoRAConfig: quantize={self.quantize!r} must be None or 'nf4'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def lora_alpha(self) -> float:
        """PEFT's name of ``alpha``."""
        return self.alpha

    @property
    def lora_dropout(self) -> float:
        """PEFT's name of ``dropout``."""
        return self.dropout

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (qualified) is a target by ``target_modules`` and not
        excluded (``"all-linear"`` matches every name: the caller filters linears by type)."""
        return _match(self.target_modules, name) and not (
            self.exclude_modules is not None and _match(self.exclude_modules, name)
        )

    def unmatched_targets(self, names: Sequence[str]) -> list[str]:
        """The listed ``target_modules`` that match none of ``names`` (empty for a regex or "all-linear")."""
        if not isinstance(self.target_modules, tuple):
            return []
        return [t for t in self.target_modules if not any(_match((t,), n) for n in names)]

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        """Inverse of ``to_dict``. Raises ValueError naming an unknown field."""
        return cls(**known_fields(cls, data))


def _one_name(ours: str, value, peft: str, peft_value, default):
    if value is not None and peft_value is not None and value != peft_value:
        raise ValueError(f"LoRAConfig: {ours}={value!r} and {peft}={peft_value!r} disagree; give one")
    return value if value is not None else peft_value if peft_value is not None else default


def _targets(field: str, value) -> tuple[str, ...] | str:
    """A regex / "all-linear" string stays a string; any other iterable of names becomes a tuple."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"LoRAConfig: {field}={value!r} is not a valid regex ({err})") from err
        return value
    names = tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoRAConfig: {field}={value!r} must be a non-empty list of module names")
    return names


def _match(pattern: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex on the whole name; names match exactly or as a "." suffix."""
    if pattern == "all-linear":
        return True
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def known_fields(cls: type, data: Any) -> dict:
    """``data`` as keyword arguments of the dataclass ``cls`` (a config's ``from_dict``).

    Raises:
        ValueError: ``data`` is not a mapping, or names fields ``cls`` lacks (all named, with the known ones).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {known}")
    return data


# names that moved beside the strategy they configure (mbf.strategies.slao) or to the runtime math
_MOVED = {"ContinualConfig": "mbf.strategies.slao", "INITS": "mbf.strategies.slao",
          "FACTORS": "mbf.strategies.slao", "RENAMED": "mbf.strategies.slao", "SCHEDULES": "mbf.closed_form"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'mbf.config' has no attribute {name!r}")
    warnings.warn(f"mbf.config.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)

"""User configuration: frozen dataclasses, validated on construction, one comment per field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from mbf.reference import SCHEDULES

__all__ = [
    "BACKENDS",
    "FACTORS",
    "INITS",
    "LLAMA_LINEARS",
    "SCHEDULES",
    "ContinualConfig",
    "LoRAConfig",
    "check_lora_hyperparameters",
]

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("orthogonal", "last_merge", "random", "none")  # how task i ≥ 2's fine-tuned adapter starts
BACKENDS = ("auto", "torch", "triton", "hybrid")  # hybrid: base GEMMs in cuBLAS, low-rank parts in Triton
FACTORS = ("AB", "A", "B")  # which LoRA factors train / merge (the paper's FTBA / FREB / FREA, MB / MA / MBA)


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
        return cls(**_known_fields(cls, data))


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


@dataclass(frozen=True)
class ContinualConfig:
    """How SLAO (or an ablation) moves from one task to the next. The defaults are SLAO."""

    schedule: str = "sqrt"  # λ(i) of the merge: "sqrt" 1/√i (SLAO), "inverse" 1/i, "constant", "none" (1)
    init: str = "orthogonal"  # task i ≥ 2 starts from: "orthogonal" (QR of the last A, SLAO),
    #   "last_merge" (same A, B from the merged B), "random" (fresh LoRA init), "none" (carried as is)
    constant: float = 0.5  # λ of the "constant" schedule, in (0, 1]
    orthogonal_updates: bool = False  # keep each task's A updates out of the previous task's row space
    train: str = "AB"  # factors that train: "AB" (SLAO), "A" (B frozen), "B" (A frozen)
    # factors the time-aware merge averages with λ: "B" (SLAO: A_m = A_ft), "A" (B_m = B_ft) or "AB".
    # (Not LoRALinear.merge(), which folds an adapter into W; files before the rename say "merge".)
    merged_factors: str = "B"

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
        for field in ("train", "merged_factors"):
            value = getattr(self, field)
            if value not in FACTORS:
                raise ValueError(f"ContinualConfig: {field}={value!r} must be one of {FACTORS}")
        if not isinstance(self.orthogonal_updates, bool):
            raise ValueError(f"ContinualConfig: orthogonal_updates={self.orthogonal_updates!r} is not a bool")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ContinualConfig:
        """Inverse of ``to_dict`` (older field names too). Raises ValueError naming an unknown field."""
        return cls(**_known_fields(cls, data))


RENAMED = {"merge": "merged_factors"}  # ContinualConfig's older field names -> the current ones


def _known_fields(cls, data: dict) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    if cls is ContinualConfig:
        data = {RENAMED.get(k, k): v for k, v in data.items()}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {known}")
    return data

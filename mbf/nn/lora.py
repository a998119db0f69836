"""LoRALinear: a drop-in replacement for ``nn.Linear`` carrying SLAO's two adapters.

The fine-tuned adapter (``lora_A``, ``lora_B``) trains; the merged adapter (``merged_A``,
``merged_B``) is a pair of frozen buffers updated at task boundaries. ``adapter_mode`` picks which
one the forward uses:

- ``"finetuned"``: ``y = x W0ᵀ + b + s (drop(x) A_ftᵀ) B_ftᵀ`` (training),
- ``"merged"``: ``y = x W0ᵀ + b + s (x A_mᵀ) B_mᵀ`` (inference with the merged adapter),
- ``"preview"``: ``B_eff = B_m + λ (B_ft − B_m)`` formed inside the kernel with the runtime ``lam``,
  i.e. what the merge of this task would give, without materialising it.

``eval_adapter_mode``, when set, is the mode used while the module is in ``eval()``: a Trainer then
evaluates with SLAO's adapters while it trains the fine-tuned one (``mbf.integrations.SLAOCallback``).

A strategy may add a frozen term of its own after the layer's forward (a forward hook): the past tasks'
LoRAs of O-LoRA and InfLoRA (every mode), the dense merged ΔW of task arithmetic / TIES (the
``"merged"`` mode). It registers it as the layer's ``extra_term`` (``ExtraTerm``), so that ``fold()``
(and ``mbf.eject(fold=True)``) folds it with the adapter, exactly what the layer computes, and the
hook adds nothing while the layer is folded. To *fold* is to add an adapter's ``s · B A`` into the base
weight (PEFT's ``merge()``; ``merge()`` / ``unmerge()`` remain, deprecated); *merge* is SLAO's merge.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from mbf import functional
from mbf.config import check_lora_hyperparameters
from mbf.nf4 import is_bnb_linear4bit
from mbf.nn.nf4 import NF4Linear

__all__ = ["LoRALinear"]

MODES = ("finetuned", "merged", "preview")
ADAPTERS = ("finetuned", "merged")  # the two adapters a layer holds
# how a function picks one of them: "auto" is the adapter inference uses (the merged one once a task
# has been merged, the fine-tuned one before); None, the old default of ``fold()``, means "auto"
ADAPTER_CHOICES = ("auto", *ADAPTERS)


def choose_adapter(adapter: str | None, merged_exists: bool, where: str = "") -> str:
    """The one rule behind every ``adapter=`` argument: ``"merged"`` or ``"finetuned"``.

    Args:
        adapter: ``"auto"`` (or None): the merged adapter once a task has been merged, else the
            fine-tuned one; ``"merged"``; ``"finetuned"``.
        merged_exists: whether a task has been merged (the merged adapter is not zero).
        where: what the error message starts with (a layer name and ``": "``).

    Raises:
        ValueError: an unknown choice, or ``"merged"`` while it is zero.
    """
    if adapter is None or adapter == "auto":
        return "merged" if merged_exists else "finetuned"
    if adapter not in ADAPTERS:
        raise ValueError(f"{where}adapter={adapter!r} must be one of {', '.join(map(repr, ADAPTER_CHOICES))}")
    if adapter == "merged" and not merged_exists:
        raise ValueError(
            f"{where}no task has been merged yet: the merged adapter is zero; use adapter='finetuned' "
            "(or 'auto')"
        )
    return adapter


class ExtraTerm:
    """A strategy's frozen term that its forward hook adds to a layer's output in ``modes``.

    Args:
        owner: the strategy object that holds it (its ``remove()`` clears its own terms only).
        modes: the layer modes in which the hook adds it.
        delta: ``() -> (out, in) fp32 tensor | None``: the weight the hook's addition equals, ``x ΔWᵀ``
            (None while it adds nothing: no task finished, or the hooks are off).
    """

    __slots__ = ("delta", "modes", "owner")

    def __init__(
        self, owner: object, modes: tuple[str, ...], delta: Callable[[], torch.Tensor | None]
    ) -> None:
        self.owner, self.modes, self.delta = owner, tuple(modes), delta


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a LoRA adapter; same forward signature and output dtype.

    Over a 4-bit base (QLoRA): ``base`` may be an ``mbf.NF4Linear`` or a bitsandbytes NF4
    ``Linear4bit`` (converted zero-copy to an NF4Linear; ``eject`` gives the Linear4bit back).

    Args:
        base: the frozen linear; kept as ``self.base`` so ``eject`` can restore it.
        r: adapter rank, in ``[1, min(in_features, out_features)]``.
        alpha: ``scaling = alpha / r``.
        dropout: LoRA dropout probability on the adapter input (training only).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``mbf.functional``).
        name: the layer's name in its model, for error messages.
        dtype: adapter dtype (default: the base weight's, fp32 over a 16-bit base).

    Raises:
        ValueError: on a rank, alpha, dropout or backend out of range (naming the layer), or a
            4-bit base that is not NF4 with blocksize 64.
        TypeError: on a base that is not a linear.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        backend: str = "auto",
        name: str = "LoRALinear",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if is_bnb_linear4bit(base):  # before the nn.Linear check: Linear4bit subclasses it
            base = NF4Linear.from_bnb(base, name=name)
        if isinstance(base, NF4Linear):
            out_f, in_f = base.out_features, base.in_features
            w_device, w_dtype = base.weight_packed.device, base.compute_dtype
        elif isinstance(base, nn.Linear):
            out_f, in_f = base.weight.shape
            w_device, w_dtype = base.weight.device, base.weight.dtype
        else:
            raise TypeError(f"{name}: expected nn.Linear, got {type(base).__name__} (or NF4 4-bit)")
        check_lora_hyperparameters(name, r, alpha, dropout, backend, max_rank=min(in_f, out_f))
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.lora_alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.lora_dropout, self.backend, self.layer_name = float(dropout), backend, name
        # Adapters over a 16-bit base live in fp32 by default, like PEFT's autocast_adapter_dtype: AdamW's
        # small updates would round away in bf16. The torch paths run the LoRA branch in fp32 too.
        if dtype is None:
            dtype = torch.float32 if w_dtype in (torch.float16, torch.bfloat16) else w_dtype
        factory = {"device": w_device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_f, r, **factory))  # (out, r)
        self.register_buffer("merged_A", torch.zeros(r, in_f, **factory))
        self.register_buffer("merged_B", torch.zeros(out_f, r, **factory))
        self.adapter_mode = "finetuned"
        self.eval_adapter_mode: str | None = None  # the mode in eval() when set (e.g. under a Trainer)
        self._warned_eval_grad = False  # the eval()-without-gradient warning is given once per layer
        self.lam = 1.0  # λ of the "preview" mode; a runtime scalar, never a recompile
        self.folded_adapter: str | None = None  # the adapter folded into the base weight (fold()/unfold())
        self.disabled = False  # True inside mbf.disable_adapter(model): the base alone
        self._folded_delta: torch.Tensor | None = None  # what fold() added to a dense base.weight
        self._nf4_base: NF4Linear | None = None  # the 4-bit base while folded into a 16-bit copy
        self.extra_term: ExtraTerm | None = None  # a strategy's frozen term (past LoRAs, a merged ΔW)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, **kwargs) -> LoRALinear:
        """Wrap an ``nn.Linear``, NF4Linear or bnb ``Linear4bit`` (its weight is shared, not copied)."""
        return cls(linear, r=r, alpha=alpha, **kwargs)

    @property
    def folded(self) -> bool:
        """True while an adapter is folded into the base weight (``fold()`` / ``unfold()``)."""
        return self.folded_adapter is not None

    @property
    def is_4bit(self) -> bool:
        """True while the base is an NF4 weight (False after ``fold()`` folds it into a 16-bit copy)."""
        return isinstance(self.base, NF4Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight; over a 4-bit base, a fresh dequantised 16-bit copy (read-only use)."""
        return self.base.dequantize() if self.is_4bit else self.base.weight

    def _base_dtype(self) -> torch.dtype:
        return self.base.compute_dtype if self.is_4bit else self.base.weight.dtype

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self) -> None:
        """The usual LoRA init (PEFT's): A Kaiming-uniform, B zero, so the layer starts as the base."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def mode(self) -> str:
        """The mode the forward uses now: ``adapter_mode``, or ``eval_adapter_mode`` in eval() when set."""
        in_eval = not self.training and self.eval_adapter_mode is not None
        return self.eval_adapter_mode if in_eval else self.adapter_mode

    def _active(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """(A, B, merged_B or None, λ) of the adapter the forward uses."""
        mode = self.mode
        if mode not in MODES:
            raise ValueError(f"{self.layer_name}: adapter_mode {mode!r} must be one of {MODES}")
        if mode == "merged":
            return self.merged_A, self.merged_B, None, 1.0
        if mode == "preview":
            return self.lora_A, self.lora_B, self.merged_B, float(self.lam)
        return self.lora_A, self.lora_B, None, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` → ``(..., out_features)`` in x's dtype.

        Raises:
            TypeError: x is not floating point, or (outside autocast) its dtype differs from a dense base's.
            ValueError: x has the wrong number of features (the messages name the layer).
        """
        self._check_input(x)
        if self.disabled:
            return self.base(x)
        if self.folded:
            self.check_mode(self.mode)
            return self.base(x)
        if self.mode != self.adapter_mode and not self._warned_eval_grad and self._wants_grad():
            # eval() switched to the merged adapter (frozen buffers): a loss from this forward trains nothing
            self._warned_eval_grad = True
            warnings.warn(
                f"mbf LoRA layers (first: {self.layer_name}) in eval() mode compute with the "
                f"{self.mode} adapter, which gets no gradient; call model.train() before training the "
                "fine-tuned adapter (or cl.set_eval_adapter(None) to keep it in eval() too)",
                stacklevel=2,
            )
        A, B, merged_B, lam = self._active()
        dropout = self.lora_dropout if self.training and self.mode == "finetuned" else 0.0
        weight = self.base.nf4 if self.is_4bit else self.base.weight
        return functional.lora_linear(
            x, weight, self.base.bias, A, B, self.scaling, merged_B, lam,
            dropout=dropout, backend=self.backend, name=self.layer_name,
        )  # fmt: skip

    def _wants_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"{self.layer_name}: input dtype {x.dtype} is not floating point")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer_name}: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        base_dtype = self._base_dtype()
        if not self.is_4bit and x.dtype != base_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.layer_name}: input dtype {x.dtype} but the base weight is {base_dtype}; cast one of "
                "them (or run under torch.autocast)"
            )

    def has_merged_adapter(self) -> bool:
        """True once a task has been merged (``merged_A`` is the last task's A, never all zeros; or the
        strategy's merged ΔW computes in the ``"merged"`` mode alone: task arithmetic / TIES)."""
        term = self.extra_term
        merged_only = term is not None and term.modes == ("merged",) and term.delta() is not None
        return merged_only or bool(self.merged_A.detach().any())

    def _extra_delta(self, adapter: str) -> torch.Tensor | None:
        """The strategy's frozen term (fp32 ``(out, in)``) that computes beside ``adapter``, or None."""
        term = self.extra_term
        return term.delta() if term is not None and adapter in term.modes else None

    def resolve_adapter(self, adapter: str | None) -> str:
        """``"merged"`` or ``"finetuned"`` for an adapter choice (``"auto"``/None: what inference uses).

        Raises:
            ValueError: an unknown choice, or ``"merged"`` before any task was merged (it is zero).
        """
        return choose_adapter(adapter, self.has_merged_adapter(), f"{self.layer_name}: ")

    def check_mode(self, mode: str) -> None:
        """Raise ValueError (naming the layer) when an adapter is folded and ``mode`` would compute
        with another one (the forward would silently use the folded one)."""
        if self.folded and mode != self.folded_adapter:
            raise ValueError(
                f"{self.layer_name}: the {self.folded_adapter} adapter is folded into the weight; unfold() "
                f"it before using the {mode} one"
            )

    def _fold_choice(self, adapter: str | None) -> str:
        """What a fold of ``adapter`` folds: None, the forward's current mode (PEFT: merging leaves the
        output unchanged), else ``resolve_adapter``'s choice."""
        return self.mode if adapter is None else self.resolve_adapter(adapter)

    def get_delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """``s · B Aᵀ`` (``(out, in)``, fp32 math, base weight dtype) of ``adapter``: ``"finetuned"``,
        ``"merged"``, ``"auto"`` (the one inference uses) or None (the one the forward uses now)."""
        return self._delta_fp32(adapter).to(self._base_dtype())

    def _delta_fp32(self, adapter: str | None = None) -> torch.Tensor:
        adapter = self._fold_choice(adapter)
        if adapter == "merged":
            A, B = self.merged_A, self.merged_B
        elif adapter == "preview":
            A, B = self.lora_A, torch.lerp(self.merged_B.float(), self.lora_B.float(), float(self.lam))
        else:
            A, B = self.lora_A, self.lora_B
        return self.scaling * (B.float() @ A.float())

    def _folded_weight(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0 + s B Aᵀ (+ the strategy's term), the delta added)`` of a resolved ``adapter``, computed
        without changing anything: what the layer computes with ``adapter``, forward hooks included.

        Over a 4-bit base: fp32 (one rounding, at the 16-bit copy) and no delta to remember.
        """
        delta = self._delta_fp32(adapter)
        extra = self._extra_delta(adapter)
        if extra is not None:
            delta = delta + extra.to(delta.device, delta.dtype)
        if self.is_4bit:
            return self.base.dequantize(torch.float32) + delta, None
        delta = delta.to(self._base_dtype())
        return self.base.weight + delta, delta

    @torch.no_grad()
    def check_fold(self, adapter: str | None = None) -> None:
        """Raise ValueError (naming the layer) when folding ``adapter`` is impossible: unknown, a zero
        merged adapter, another adapter already folded, or non-finite folded weights."""
        adapter = self._fold_choice(adapter)
        if self.folded:
            self.check_mode(adapter)
        elif not torch.isfinite(self._folded_weight(adapter)[0]).all():
            raise ValueError(f"{self.layer_name}: folding would produce non-finite weights; not folded")

    @torch.no_grad()
    def fold(self, adapter: str | None = None, *, safe: bool = True) -> None:
        """Fold an adapter into the base weight (PEFT's ``merge()``); forward is then the base alone.

        Args:
            adapter: ``"finetuned"``, ``"merged"`` (SLAO's merged adapter), ``"auto"`` (the one
                inference uses), or None: the one the forward uses now (a ``"preview"`` included), so
                that folding leaves the output as it was. Folding the folded adapter again does nothing.
            safe: check the folded weight is finite before writing it (PEFT's ``safe_merge``).

        A strategy's frozen term that computes with the folded adapter (``extra_term``: O-LoRA's and
        InfLoRA's past tasks' LoRAs, the dense merged ΔW of task arithmetic / TIES) is folded with it, so
        that the layer computes what it computed before; its hook adds nothing while the layer is folded.

        Over a 4-bit base the result is a new 16-bit ``nn.Linear`` (dequantised base + delta, in the
        compute dtype): a folded 4-bit weight is never re-quantised, which would destroy what was
        learned. ``unfold()`` puts the untouched 4-bit base back.

        Raises:
            ValueError: with ``safe``, when the folded weight would be non-finite; when another
                adapter is folded already, or ``"merged"`` is asked for before any task was merged
                (nothing changes).
        """
        adapter = self._fold_choice(adapter)
        if self.folded:
            self.check_mode(adapter)
            return
        new_w, delta = self._folded_weight(adapter)
        if safe and not torch.isfinite(new_w).all():
            raise ValueError(f"{self.layer_name}: folding would produce non-finite weights; not folded")
        if self.is_4bit:
            self._swap_in_dense(new_w)
        else:
            self.base.weight.copy_(new_w)
            self._folded_delta = delta  # unfold() subtracts this very delta: the mode or λ may change
        self.folded_adapter = adapter

    def _swap_in_dense(self, new_w: torch.Tensor) -> None:
        nf4 = self.base
        self.__dict__["_nf4_base"] = nf4  # not a submodule: the folded state_dict is the 16-bit one
        self.base = nf4.to_linear(new_w)

    @torch.no_grad()
    def unfold(self) -> None:
        """Undo ``fold()`` (exact up to the base dtype's rounding; exact over a 4-bit base)."""
        if not self.folded:
            return
        if self._nf4_base is not None:
            self.base, self.__dict__["_nf4_base"] = self._nf4_base, None
        else:
            self.base.weight.sub_(self._folded_delta)
            self._folded_delta = None
        self.folded_adapter = None

    def merge(self, safe_merge: bool = True, adapter: str | None = None) -> None:
        """Deprecated: PEFT's name of ``fold(adapter, safe=safe_merge)``."""
        warnings.warn("LoRALinear.merge() is deprecated: use fold()", DeprecationWarning, stacklevel=2)
        self.fold(adapter, safe=safe_merge)

    def unmerge(self) -> None:
        """Deprecated: PEFT's name of ``unfold()``."""
        warnings.warn("LoRALinear.unmerge() is deprecated: use unfold()", DeprecationWarning, stacklevel=2)
        self.unfold()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"{'nf4 base, ' if self.is_4bit else ''}"
            f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.lora_dropout:g}, "
            f"backend={self.backend!r}"
        )

"""SLAO (Merge before Forget): ``ContinualLoRA``, the strategy over a model's LoRA layers, and its config.

Task ``i = task_index + 1``:

- ``begin_task()``: task 1 keeps the usual LoRA init. Task ``i ≥ 2`` starts from the previous task's
  *fine-tuned* adapter: ``A ← Qᵀ`` with ``Q R = qr(A_prevᵀ)``, ``diag(R) ≥ 0``; ``B`` is carried over (init
  ``"orthogonal"``). Ablations: ``"last_merge"`` (same A, B from the merged B), ``"random"`` (a fresh
  LoRA init), ``"none"`` (carry A and B unchanged: no QR).
- ``end_task()``: ``A_m ← A_ft``; ``B_m ← B_m + λ(i) (B_ft − B_m)``, ``λ`` from ``schedule``.

The paper's merge-strategy ablations are two more options: ``train`` (which factors train: "AB", or "A"
with B frozen — B then starts from a random init and A from zero, else the adapter would stay zero — or
"B" with A frozen) and ``merged_factors`` (which factors are merged with λ: "B" as SLAO, "A" with
``B_m ← B_ft``, or "AB"). E.g. FREB-MA is ``train="A", merged_factors="A"``.

State is two adapters per layer whatever the number of tasks (other methods: ``mbf.strategies``).
Sequential LoRA (the baseline that forgets) is ``init="none", schedule="none"``: merged = fine-tuned.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mbf import checkpoint, functional
from mbf.closed_form import SCHEDULES, lam_schedule
from mbf.distributed import assign_, check_ranks, full, is_writer, world_size
from mbf.inject import eject, inject, lora_layers
from mbf.nn.lora import MODES
from mbf.nn.model import release_hooks, use_adapter
from mbf.strategies.base import StrategyConfig, StrategyDefaults

__all__ = ["EVAL_ADAPTERS", "FACTORS", "INITS", "RENAMED", "ContinualConfig", "ContinualLoRA"]

EVAL_ADAPTERS = ("auto", *MODES, None)  # what set_eval_adapter takes
INITS = ("orthogonal", "last_merge", "random", "none")  # how task i ≥ 2's fine-tuned adapter starts
FACTORS = ("AB", "A", "B")  # which LoRA factors train / merge (the paper's FTBA / FREB / FREA, MB / MA / MBA)
RENAMED = {"merge": "merged_factors"}  # ContinualConfig's older field names -> the current ones
_OWNER = "mbf_continual_owner"  # model.__dict__ key: a weak reference to the ContinualLoRA driving it


@dataclass(frozen=True)
class ContinualConfig(StrategyConfig):
    """How SLAO (or an ablation) moves from one task to the next. The defaults are SLAO."""

    schedule: str = "sqrt"  # λ(i) of the merge: "sqrt" 1/√i (SLAO), "inverse" 1/i, "constant", "none" (1)
    init: str = "orthogonal"  # task i ≥ 2 starts from: "orthogonal" (QR of the last A, SLAO),
    #   "last_merge" (same A, B from the merged B), "random" (fresh LoRA init), "none" (carried as is)
    constant: float = 0.5  # λ of the "constant" schedule, in (0, 1]
    orthogonal_updates: bool = False  # keep each task's A updates out of the previous task's row space
    train: str = "AB"  # factors that train: "AB" (SLAO), "A" (B frozen), "B" (A frozen)
    # factors the time-aware merge averages with λ: "B" (SLAO: A_m = A_ft), "A" (B_m = B_ft) or "AB".
    # (Not LoRALinear.fold(), which adds an adapter into W; files before the rename say "merge".)
    merged_factors: str = "B"

    def __post_init__(self) -> None:
        for name, value, ok in (("schedule", self.schedule, SCHEDULES), ("init", self.init, INITS)):
            if value not in ok:
                raise ValueError(f"ContinualConfig: unknown {name} {value!r}; choose one of {', '.join(ok)}")
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

    @classmethod
    def from_dict(cls, data: dict) -> ContinualConfig:
        """Inverse of ``to_dict`` (older field names too). Raises ValueError naming an unknown field."""
        renamed = {RENAMED.get(k, k): v for k, v in data.items()} if isinstance(data, dict) else data
        return super().from_dict(renamed)


class ContinualLoRA(StrategyDefaults):
    """Drive SLAO's task boundaries for every LoRALinear of ``model`` (a ``mbf.strategies`` strategy).

    Args:
        model: a model with LoRA layers (see ``mbf.inject``).
        config: the method (default ``ContinualConfig()``: SLAO); keyword options (its field names)
            override its fields.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the QR and the merge.
        distributed: under DDP / FSDP2, every rank runs each task boundary, save and load, and a rank
            that does not is an error on all ranks (default: when torch.distributed is initialised
            with more than one rank; ``False`` for a rank-local copy).

    Strict mode (``orthogonal_updates=True``, ``project_updates()``): in task ``i ≥ 2`` the fine-tuned A
    moves only orthogonally to the last task's row space (``A = A₀ + ΔA``, ``ΔA Qᵀ = 0``): for conflicting
    tasks where forgetting (BWT) matters more than learning each new task. Costs two extra ``(r, in)``
    copies per layer during a task and one batched projection per call.

    The newest ContinualLoRA of a model drives it: an older one, or one whose layers were ejected,
    refuses to act (RuntimeError) instead of training and saving layers the model no longer runs.

    Raises:
        ValueError: on an unknown option or value, or a model without LoRA layers.
    """

    strategy_name, config_class = "slao", ContinualConfig  # "slao" covers every ablation (config)

    def __init__(
        self, model: nn.Module, config: ContinualConfig | None = None, *, backend: str = "auto",
        distributed: bool | None = None, _release_hooks: bool = True, **options,
    ) -> None:  # fmt: skip
        # _release_hooks=False: load() keeps the strategy driving the model until this one has loaded
        self._take(model, config, {RENAMED.get(k, k): v for k, v in options.items()}, release=_release_hooks)
        self.backend = backend
        # every rank must run each boundary (mbf.distributed.check_ranks); None: when a process group
        # of more than one rank is initialised. False for a rank-local copy (e.g. inspecting on rank 0).
        self.distributed = world_size() > 1 if distributed is None else distributed
        self._basis: list[torch.Tensor] | None = None  # strict mode: previous task's orthonormal rows
        self._start: list[torch.Tensor] | None = None  # strict mode: each lora_A as the task began
        self._eval_adapter: str | None = "auto"  # see set_eval_adapter
        model.__dict__[_OWNER] = weakref.ref(self)  # the newest drives the model (see _check_live)
        self._apply_eval_adapter()

    # -- task boundaries --------------------------------------------------------------------------

    def lam(self, i: int | None = None) -> float:
        """λ(i) of this schedule; task ``i`` defaults to the current one."""
        i = self.task_index + 1 if i is None else i
        return lam_schedule(self.config.schedule, i, self.config.constant)

    @torch.no_grad()
    def begin_task(self) -> None:
        """Initialise the fine-tuned adapter for task ``task_index + 1``.

        Raises:
            RuntimeError: when the previous task was not ended.
        """
        self._check_task(opening=True)
        self._check_live("begin_task", training=True)
        self._check_ranks("begin_task")
        layers, cfg = list(self.layers.values()), self.config
        basis = None  # orthonormal rows of the previous task's A (QR init, strict mode)
        if self.task_index > 0 and (cfg.init in ("orthogonal", "last_merge") or cfg.orthogonal_updates):
            basis = functional.orthonormal_rows(
                self._whole("A"), names=list(self.layers), backend=self.backend
            )
        self._init_adapters(basis)
        if cfg.orthogonal_updates:
            self._start = [A.clone() for A in self._whole("A")]
            self._basis = basis
        for layer in layers:  # the paper's FREA / FREB ablations freeze one factor
            layer.lora_A.requires_grad_("A" in cfg.train)
            layer.lora_B.requires_grad_("B" in cfg.train)
        self.in_task = True  # last: a failed init (non-finite A) leaves the task not begun

    def _init_adapters(self, basis: list[torch.Tensor] | None) -> None:
        layers, cfg = list(self.layers.values()), self.config
        fresh = cfg.init == "random" if self.task_index > 0 else "B" not in cfg.train  # B frozen from task 1
        if fresh:
            for layer in layers:
                self._fresh_init(layer)
        if self.task_index == 0 or cfg.init in ("random", "none"):
            return
        for layer, Q in zip(layers, basis):  # "orthogonal" or "last_merge"
            assign_(layer.lora_A, Q)
            if cfg.init == "last_merge":
                assign_(layer.lora_B, layer.merged_B)

    def _fresh_init(self, layer) -> None:
        """LoRA's usual init; with B frozen (FREB) the roles swap, else the adapter would stay zero."""
        layer.reset_lora_parameters()
        if "B" not in self.config.train:
            nn.init.kaiming_uniform_(layer.lora_B, a=5**0.5)
            nn.init.zeros_(layer.lora_A)

    @torch.no_grad()
    def project_updates(self) -> None:
        """Strict mode: ``A ← A₀ + ΔA − (ΔA Qᵀ) Q`` with ``ΔA = A − A₀`` the update since ``begin_task()``
        and ``Q`` the previous task's orthonormal rows, all layers in one batched call. After every
        ``optimizer.step()`` (``after_step``) and once more in ``end_task()``. Projecting the update, not
        the gradient, keeps the constraint exact for any optimizer (Adam rescales each element). A no-op
        without ``orthogonal_updates``, in task 1 and outside a task."""
        if not (self.config.orthogonal_updates and self.in_task and self._basis is not None):
            return
        deltas = torch._foreach_sub(self._whole("A"), self._start)  # (r, in) each
        kept = functional.project_out_all(deltas, self._basis, backend=self.backend)
        for layer, A in zip(self.layers.values(), torch._foreach_add(self._start, kept)):
            assign_(layer.lora_A, A)

    after_step = project_updates  # the strategy protocol's name for it
    # the fine-tuned adapter computes otherwise than the merged one, unless λ ≡ 1 (schedule "none")
    finetuned_differs = property(lambda self: self.config.schedule != "none")

    @torch.no_grad()
    def end_task(self) -> None:
        """Time-aware asymmetric merge of the task just trained; ``task_index`` advances.

        Raises:
            RuntimeError: when no task was begun.
            ValueError: when an adapter, or the merge's result, holds non-finite values (names the
                layer; the merged adapter is left as it was and the task stays open).
        """
        self._check_task(opening=False)
        self._check_live("end_task", training=True)
        self._check_ranks("end_task")
        self.project_updates()  # strict mode: the merged A obeys the constraint too
        whole = {f: self._whole(f) for f in "AB"}  # the fine-tuned factors, gathered once if sharded
        self._check_finite("fine-tuned adapter", list(zip(whole["A"], whole["B"])))
        lam = self.lam(self.task_index + 1)
        merged = [m for f in "AB" if f in self.config.merged_factors for m in self._merged(f)]
        finetuned = [t for f in "AB" if f in self.config.merged_factors for t in whole[f]]
        before = [m.clone() for m in merged]  # (out, r) / (r, in) each: insurance for all-or-nothing
        functional.time_aware_merge_(merged, finetuned, lam, backend=self.backend)
        try:  # overflow is possible with finite inputs: check the result before committing it
            self._check_finite(f"merge with λ={lam:g}", [(m,) for m in merged])
        except ValueError:
            torch._foreach_copy_(merged, before)
            raise
        for f in "AB":  # the factor that is not merged is taken as it was fine-tuned (SLAO: A)
            if f not in self.config.merged_factors:
                torch._foreach_copy_(self._merged(f), whole[f])
        self.task_index, self.in_task = self.task_index + 1, False
        self._basis = self._start = None
        self._apply_eval_adapter()  # from now on eval() uses the merged adapter (unless told otherwise)

    def _merged(self, factor: str) -> list[torch.Tensor]:
        """Every layer's ``merged_A`` (factor ``"A"``) or ``merged_B`` buffer."""
        return [getattr(layer, f"merged_{factor}") for layer in self.layers.values()]

    def _whole(self, factor: str) -> list[torch.Tensor]:
        """Every layer's fine-tuned ``lora_A`` / ``lora_B``, detached and whole (gathered under FSDP2)."""
        return [full(getattr(layer, f"lora_{factor}").detach()) for layer in self.layers.values()]

    def _check_live(self, op: str, training: bool = False) -> None:
        """Raise RuntimeError unless this object still drives the model's LoRA layers (``training``: and
        none has an adapter folded into its weight, which would take no gradient)."""
        modules, owner = dict(self.model.named_modules()), self.model.__dict__.get(_OWNER)
        why = None
        if any(modules.get(n) is not layer for n, layer in self.layers.items()):
            why = "its LoRA layers were ejected or replaced"
        elif owner is None or owner() is not self:
            why = "another ContinualLoRA was created on the same model; use that one"
        if why:
            raise RuntimeError(f"ContinualLoRA.{op}: this ContinualLoRA no longer drives the model: {why}")
        folded = [n for n, layer in self.layers.items() if layer.folded] if training else []
        if folded:
            raise RuntimeError(f"ContinualLoRA.{op}: {folded[0]} has an adapter folded in; unfold() it")

    def _check_ranks(self, op: str) -> None:
        if self.distributed:
            check_ranks(op, self.task_index, self.in_task, next(iter(self.layers.values())).merged_B.device)

    def _check_finite(self, what: str, per_layer: list[tuple[torch.Tensor, ...]]) -> None:
        """One host sync for the whole model; the per-layer search runs only when something is wrong."""
        flat = torch.cat([t.detach().reshape(-1) for ts in per_layer for t in ts])
        if bool(torch.isfinite(flat).all()):
            return
        for name, ts in zip(self.layers, per_layer):
            if not all(bool(torch.isfinite(t).all()) for t in ts):
                raise ValueError(f"{name}: {what} has non-finite values; refusing to merge")

    @contextmanager
    def adapter_mode(self, mode: str, lam: float | None = None) -> Iterator[nn.Module]:
        """Run the model with ``mode`` (``"finetuned"``, ``"merged"``, ``"preview"`` at ``lam``, default
        the current task's λ), in training and in eval() alike (``mbf.nn.model.use_adapter``).

        Raises:
            ValueError: an unknown mode, or a layer with another adapter folded into its weight.
        """
        self._check_live("adapter_mode")
        with use_adapter(self.layers.values(), mode, self.lam() if lam is None else lam):
            yield self.model

    def set_eval_adapter(self, mode: str | None) -> None:
        """The adapter every layer uses in eval() from now on.

        Args:
            mode: ``"auto"`` (the default): the merged adapter once a task has been merged (what
                inference uses, what ``save_peft_adapter`` exports), the fine-tuned one before;
                ``"merged"``, ``"finetuned"``; ``"preview"``: what the merge of the current task would
                give (λ of the current task); None: the same adapter as in training.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in EVAL_ADAPTERS:
            raise ValueError(f"set_eval_adapter: {mode!r} must be one of {EVAL_ADAPTERS}")
        self._check_live("set_eval_adapter")
        self._eval_adapter = mode
        self._apply_eval_adapter()

    def _apply_eval_adapter(self) -> None:
        mode = self._eval_adapter if self._eval_adapter != "auto" else "merged" if self.task_index else None
        for layer in self.layers.values():
            layer.eval_adapter_mode, layer.lam = mode, self.lam()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every ``lora_A`` and ``lora_B`` that trains (``config.train``): what the optimizer should get."""
        factors = [f"lora_{f}" for f in "AB" if f in self.config.train]
        return [getattr(layer, name) for layer in self.layers.values() for name in factors]

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor | int | dict]:
        """Both adapters of every layer (whole, also under FSDP2) plus the task counter and options."""
        tensors = {f"{name}.{key}": full(getattr(layer, key).detach())
                   for name, layer in self.layers.items() for key in checkpoint.STATE_KEYS}  # fmt: skip
        state = {"task_index": self.task_index, "in_task": self.in_task, "config": self.config.to_dict()}
        return {**state, "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``: every tensor is checked before any is copied (all or nothing).

        Raises:
            KeyError: a LoRA tensor of this model is missing, or the state has one this model lacks.
            ValueError: a saved tensor's shape differs from the layer's (all name the tensor).
        """
        self._check_live("load_state_dict")
        for dst, src in checkpoint.state_pairs(self.layers, state["tensors"]):
            assign_(dst, src)
        self.task_index = int(state["task_index"])
        self.in_task = bool(state.get("in_task", False))
        self._apply_eval_adapter()

    def adapter_bytes(self) -> int:
        """Bytes of adapter state held: two adapters per layer, whatever the number of tasks."""
        return sum(t.numel() * t.element_size() for t in self.state_dict()["tensors"].values())

    def save(self, path: str | Path) -> Path:
        """Write the state into directory ``path``: a crash at any point leaves a loadable checkpoint
        (``mbf.checkpoint``). Under DDP or FSDP2 every rank calls it (the sharded adapters are gathered)
        and rank 0 writes."""
        if self.in_task and self.config.orthogonal_updates:
            raise RuntimeError(
                "strict mode (orthogonal_updates) cannot be saved mid-task; save after end_task()"
            )
        self._check_live("save")
        self._check_ranks("save")
        ckpt = checkpoint.Checkpoint(
            self.task_index, self.in_task, self.config, getattr(self.model, "mbf_lora_config", None),
            self.state_dict()["tensors"],
        )  # fmt: skip
        return checkpoint.write_checkpoint(path, ckpt) if not self.distributed or is_writer() else Path(path)

    @classmethod
    def load(
        cls, model: nn.Module, path: str | Path, backend: str = "auto", distributed: bool | None = None,
        config: ContinualConfig | None = None,
    ) -> ContinualLoRA:  # fmt: skip
        """Rebuild from ``save(path)``; injects the saved LoRAConfig first when the model has no LoRA. All or
        nothing: the checkpoint is validated completely before the model's adapters change, and a model this
        call injected is ejected again when loading fails. ``config``: the method from now on (None: the
        saved one), e.g. a resumed run's accepted change.

        Raises:
            FileNotFoundError, ValueError, KeyError: a missing, malformed, corrupted or mismatched
                checkpoint (the message names the file, field or tensor).
        """
        ckpt = checkpoint.read_checkpoint(path, config_class=ContinualConfig)
        injected = not lora_layers(model)
        if injected:
            if ckpt.lora_config is None:
                raise ValueError(f"{path}: model has no LoRA layers and no LoRAConfig was saved")
            inject(model, ckpt.lora_config)
        previous = model.__dict__.get(_OWNER)
        try:
            checkpoint.check_lora_config(path, ckpt.lora_config, getattr(model, "mbf_lora_config", None))
            config = config or ckpt.config
            cl = cls(model, config, backend=backend, distributed=distributed, _release_hooks=False)
            cl._restore(ckpt)
            release_hooks(model)  # only now: a failed load leaves the strategy that drove the model as it was
        except BaseException:
            if injected:
                eject(model)
            elif previous is not None and previous() is not None:  # the one that drove it still does
                model.__dict__[_OWNER] = previous
                previous()._apply_eval_adapter()
            raise
        return cl

    def restore(self, path: str | Path) -> None:
        """Load ``save(path)`` into this object, in place (a Trainer's resume keeps its callback's object).

        Raises:
            FileNotFoundError, ValueError, KeyError: as ``load``; ValueError also when the checkpoint
                was saved with another ``ContinualConfig`` than this object's.
        """
        ckpt = checkpoint.read_checkpoint(path, config_class=ContinualConfig)
        checkpoint.check_lora_config(path, ckpt.lora_config, getattr(self.model, "mbf_lora_config", None))
        if ckpt.config != self.config:
            raise ValueError(f"{path}: saved with {ckpt.config} but this ContinualLoRA runs {self.config}")
        self._restore(ckpt)

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        self._check_ranks("load")
        self.load_state_dict(vars(ckpt))  # the fields it reads: task_index, in_task, tensors

"""A model's LoRA layers and linears, and which of the two adapters a model-wide call means."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from mbf.nn.lora import MODES, LoRALinear, choose_adapter
from mbf.nn.nf4 import NF4Linear

__all__ = [
    "FROZEN_BRANCHES", "MERGED_DELTAS", "LayerHooks", "has_frozen_branches", "inference_adapter",
    "linear_names", "lora_layers", "release_hooks", "resolve_adapter", "use_adapter",
]  # fmt: skip

# model.__dict__ key of the per-task frozen LoRAs (mbf.strategies.branches.FrozenBranches) on its layers
FROZEN_BRANCHES = "mbf_frozen_branches"
# model.__dict__ key of a per-task merge's dense per-layer ΔW (mbf.strategies.task_merge.TaskMergeLoRA)
MERGED_DELTAS = "mbf_merged_deltas"


def has_frozen_branches(model: nn.Module) -> bool:
    """True while past tasks' frozen LoRAs (O-LoRA, InfLoRA) or a merge's dense per-layer ΔW (task
    arithmetic / TIES) compute beside the model's own adapters: one adapter per layer does not describe
    the model then."""
    held = [model.__dict__.get(key) for key in (FROZEN_BRANCHES, MERGED_DELTAS)]
    return any(h is not None and h.active() for h in held)


def release_hooks(model: nn.Module) -> None:
    """Take an earlier strategy's per-task LoRAs or merged ΔW (their forward hooks) off ``model``: a
    model runs one strategy's extra terms at a time (each holder has ``active()`` and ``remove()``)."""
    for key in (FROZEN_BRANCHES, MERGED_DELTAS):
        holder = model.__dict__.pop(key, None)
        if holder is not None:
            holder.remove()


class LayerHooks:
    """What a strategy's extra-term holder (past branches, merged ΔW) shares: the forward hooks it put on
    its ``layers`` (``_handles``) and the ``extra_term`` it set on them; ``remove()`` takes both off."""

    layers: dict
    _handles: list

    def remove(self) -> None:
        """Take the hooks off the model and the layers' extra terms that this holder set."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers.values():
            if layer.extra_term is not None and layer.extra_term.owner is self:
                layer.extra_term = None


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of ``model`` by its qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's linears (``nn.Linear``, bitsandbytes' ``Linear4bit``, NF4Linear),
    counting a LoRALinear as the linear it wraps: what ``LoRAConfig.target_modules`` selects from."""
    names, inside = [], ()
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue  # a LoRALinear's own base
        if isinstance(m, LoRALinear):
            inside = name + "."
            names.append(name)
        elif isinstance(m, (nn.Linear, NF4Linear)):
            names.append(name)
    return names


def inference_adapter(layers: dict[str, LoRALinear]) -> str:
    """``"merged"`` once a task has been merged (SLAO's inference adapter), else ``"finetuned"``."""
    return "merged" if any(layer.has_merged_adapter() for layer in layers.values()) else "finetuned"


def resolve_adapter(layers: dict[str, LoRALinear], adapter: str | None) -> str:
    """``"merged"`` or ``"finetuned"`` for a model-wide adapter choice (``choose_adapter``'s rule).

    Raises:
        ValueError: an unknown choice, or ``"merged"`` before any task has been merged (it is zero).
    """
    return choose_adapter(adapter, inference_adapter(layers) == "merged")


@contextmanager
def use_adapter(layers: Iterable[LoRALinear], mode: str, lam: float) -> Iterator[None]:
    """Inside the block every layer computes with ``mode`` (``"preview"``: at ``lam``), in training and
    in eval() alike (each layer's ``eval_adapter_mode`` is set aside, then restored).

    Raises:
        ValueError: an unknown mode, or a layer with another adapter folded into its weight.
    """
    if mode not in MODES:
        raise ValueError(f"adapter_mode: {mode!r} must be one of {', '.join(map(repr, MODES))}")
    layers = list(layers)
    for layer in layers:
        layer.check_mode(mode)
    saved = [(layer.adapter_mode, layer.eval_adapter_mode, layer.lam) for layer in layers]
    try:
        for layer in layers:
            layer.adapter_mode, layer.eval_adapter_mode, layer.lam = mode, None, float(lam)
        yield
    finally:
        for layer, (m, em, lm) in zip(layers, saved):
            layer.adapter_mode, layer.eval_adapter_mode, layer.lam = m, em, lm

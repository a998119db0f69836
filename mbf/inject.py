"""Swap a transformers model's linears for LoRALinear (and back).

Module instances are replaced on the model given; no class inside transformers is touched, and
``eject`` restores the very modules that were there before.
"""

from __future__ import annotations

from torch import nn

from mbf.config import LoRAConfig
from mbf.nf4 import is_bnb_linear4bit
from mbf.nn import LoRALinear, NF4Linear

__all__ = ["eject", "inference_adapter", "inject", "lora_layers"]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of ``model`` by its qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def inject(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace every linear whose leaf name is in ``config.targets()`` by a LoRALinear.

    All other parameters are frozen; only the adapters' ``lora_A`` and ``lora_B`` train. A bitsandbytes
    NF4 ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")``) becomes a LoRALinear over its 4-bit weight, zero-copy; with
    ``config.quantize="nf4"`` dense targets are quantised to NF4 first (QLoRA; ``eject`` then gives
    back the NF4Linear: the dense weight is gone).

    Args:
        model: a transformers model (Llama names by default) or any nn.Module.
        config: the LoRA configuration.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: when a target name matches no linear (the available names are listed), the
            model already carries LoRA layers, or a 4-bit target is not NF4 with blocksize 64.
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; eject() them before injecting again")
    targets = config.targets()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    leaves = {n.rpartition(".")[2] for n in linears}
    missing = [t for t in targets if t not in leaves]
    if missing and config.target_modules != "all-linear":
        raise ValueError(
            f"target module(s) {', '.join(map(repr, missing))} not found; available linear names: "
            f"{', '.join(sorted(leaves))}"
        )
    if not any(n.rpartition(".")[2] in targets for n in linears):
        raise ValueError(f"no linear named {', '.join(targets)}; available: {', '.join(sorted(leaves))}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    new_layers = {}
    try:  # build every layer before swapping any: a bad rank leaves the model untouched
        for name, linear in linears.items():
            if name.rpartition(".")[2] not in targets:
                continue
            src = linear
            if config.quantize == "nf4" and not is_bnb_linear4bit(linear):
                src = NF4Linear.from_linear(linear, name=name)  # QLoRA: the dense weight goes
            new_layers[name] = LoRALinear(
                src, r=config.r, alpha=config.alpha, dropout=config.dropout, backend=config.backend, name=name
            )
    except Exception:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    model.mbf_requires_grad = flags  # so that eject() gives the model back exactly as it came
    model.mbf_lora_config = config  # read by ContinualLoRA.save / load
    return model


def inference_adapter(layers: dict[str, LoRALinear]) -> str:
    """``"merged"`` once a task has been merged (SLAO's inference adapter), else ``"finetuned"``."""
    return "merged" if any(layer.has_merged_adapter() for layer in layers.values()) else "finetuned"


def eject(model: nn.Module, fold: bool = False, adapter: str = "auto") -> nn.Module:
    """Put the original linears back. With ``fold=True`` an adapter is folded into W first.

    All or nothing: with ``fold=True`` every folded weight is checked before any layer changes, so
    a non-finite one leaves the model exactly as it was (still injected).

    Args:
        model: a model after ``inject``.
        fold: fold the adapter into the base weights (PEFT's ``merge_and_unload``).
        adapter: which adapter to fold: ``"merged"`` (SLAO's merged adapter), ``"finetuned"``, or
            ``"auto"``: the one inference uses, i.e. the merged adapter once ``ContinualLoRA`` has
            ended a task, the fine-tuned one before (the same rule as ``save_peft_adapter``).

    Over a 4-bit base, ``fold=True`` gives a 16-bit ``nn.Linear`` (never a re-quantised weight);
    without it, the bnb ``Linear4bit`` that was injected (or the NF4Linear of ``quantize="nf4"``).

    Raises:
        ValueError: with ``fold=True``, when a folded weight would be non-finite (names the layer),
            or on an unknown ``adapter``.
    """
    layers = lora_layers(model)
    if adapter not in ("auto", "merged", "finetuned"):
        raise ValueError(f"adapter={adapter!r} must be 'auto', 'merged' or 'finetuned'")
    if fold:
        adapter = inference_adapter(layers) if adapter == "auto" else adapter
        for layer in layers.values():  # check every layer before changing any
            layer.check_fold(adapter)
    for name, layer in layers.items():
        if fold:
            layer.merge(safe_merge=False, adapter=adapter)
        elif layer.folded:
            layer.unmerge()
        base = layer.base
        _set_submodule(model, name, base.restore() if isinstance(base, NF4Linear) else base)
    flags = getattr(model, "mbf_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for attr in ("mbf_lora_config", "mbf_requires_grad"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model

"""Swap a transformers model's linears for LoRALinear (and back).

Module instances are replaced on the model given; no class inside transformers is touched, and
``eject`` restores the very modules that were there before.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mbf.config import LoRAConfig
from mbf.export import LORA_KEYS, save_pretrained_adapters
from mbf.nf4 import is_bnb_linear4bit
from mbf.nn import LoRALinear, NF4Linear, inference_adapter, linear_names, lora_layers, resolve_adapter
from mbf.nn.model import release_hooks

__all__ = [
    "disable_adapter",
    "eject",
    "inference_adapter",
    "inject",
    "lora_layers",
    "print_trainable_parameters",
    "target_names",
]


def _is_peft_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the linears ``config`` selects in ``model`` (PEFT's matching rules).

    Linears are ``nn.Linear`` (bitsandbytes' ``Linear4bit`` included) and ``mbf.nn.NF4Linear``;
    ``"all-linear"`` takes all of them but the model's output embedding.

    Raises:
        ValueError: a listed name that matches no linear, or no match at all (the available linear
            names are listed); a model carrying PEFT layers (convert it with ``mbf.from_peft``).
    """
    if any(_is_peft_layer(m) for m in model.modules()):
        raise ValueError(
            "model carries PEFT LoRA layers: convert it with mbf.from_peft(model) instead of inject"
        )
    linears = linear_names(model)
    if config.target_modules == "all-linear":
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        linears = [n for n in linears if model.get_submodule(n) is not head]
    chosen = [n for n in linears if config.matches(n)]
    leaves = ", ".join(sorted({n.rpartition(".")[2] for n in linears})) or "none"
    if isinstance(config.target_modules, tuple):
        missing = config.unmatched_targets(linears)
        if missing:
            missing_names = ", ".join(map(repr, missing))
            raise ValueError(f"target module(s) {missing_names} not found; available linear names: {leaves}")
    if not chosen:
        hint = ""
        if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
            hint = " (a string is a regex on the whole qualified name, as in PEFT; pass a list for names)"
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no linear{hint}; available: {leaves}"
        )
    return chosen


def inject(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace every linear ``config`` selects (see ``target_names``) by a LoRALinear.

    All other parameters are frozen; only the adapters' ``lora_A`` and ``lora_B`` train. The model's
    ``save_pretrained`` (on this instance, until ``eject``) then writes the adapters alone, as a
    ``PeftModel``'s does (``mbf.export.save_pretrained_adapters``: a Trainer checkpoints, saves and
    resumes the injected model without a callback). A bitsandbytes
    NF4 ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")``) becomes a LoRALinear over its 4-bit weight, zero-copy; with
    ``config.quantize="nf4"`` dense targets are quantised to NF4 first (QLoRA; ``eject`` then gives
    back the NF4Linear: the dense weight is gone).

    Args:
        model: a transformers model or any nn.Module.
        config: the LoRA configuration.

    Returns:
        The same model, modified in place (all or nothing: a failure leaves it untouched).

    Raises:
        ValueError: when a target matches no linear (the available names are listed), the model
            already carries LoRA layers (ours or PEFT's), a rank does not fit a layer, or a 4-bit
            target is not NF4 with blocksize 64 (the messages name the layer).
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; eject() them before injecting again")
    names = target_names(model, config)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    new_layers = {}
    try:  # build every layer before swapping any: a bad rank leaves the model untouched
        for name in names:
            src = model.get_submodule(name)
            if config.quantize == "nf4" and isinstance(src, nn.Linear) and not is_bnb_linear4bit(src):
                src = NF4Linear.from_linear(src, name=name)  # QLoRA: the dense weight goes
            layer = LoRALinear(
                src, r=config.r, alpha=config.alpha, dropout=config.dropout, backend=config.backend, name=name
            )
            new_layers[name] = layer.train(src.training)  # an eval() model stays in eval (no dropout)
    except Exception:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
    model.mbf_requires_grad = flags  # so that eject() gives the model back exactly as it came
    model.mbf_lora_config = config  # read by ContinualLoRA.save / load
    if callable(getattr(model, "save_pretrained", None)):
        # this instance only (eject removes both): save_pretrained writes the adapters alone, as a
        # PeftModel's does (a Trainer's checkpoints and save_model() included), and a Trainer that
        # resumes from them loads the LoRA tensors without listing every frozen weight as "missing"
        model.save_pretrained = functools.partial(save_pretrained_adapters, model)
        frozen = [k for k in model.state_dict() if k.rpartition(".")[2] not in LORA_KEYS]
        model._keys_to_ignore_on_save = frozen
    return model


def eject(model: nn.Module, fold: bool = False, adapter: str | None = "auto") -> nn.Module:
    """Put the original linears back. With ``fold=True`` an adapter is folded into W first.

    All or nothing: with ``fold=True`` every folded weight is checked before any layer changes, so
    a non-finite one leaves the model exactly as it was (still injected).

    Args:
        model: a model after ``inject``.
        fold: fold the adapter into the base weights (PEFT's ``merge_and_unload``), together with what a
            strategy adds to it (O-LoRA's and InfLoRA's past tasks' LoRAs, the merged ΔW of task
            arithmetic / TIES): the folded model computes what the model computed in eval().
        adapter: which adapter to fold: ``"merged"`` (SLAO's merged adapter), ``"finetuned"``, or
            ``"auto"``: the one inference uses, i.e. the merged adapter once ``ContinualLoRA`` (or a
            task merge) has ended a task, the fine-tuned one before (the same rule as
            ``save_peft_adapter``; O-LoRA and InfLoRA compute with the fine-tuned one).

    Over a 4-bit base, ``fold=True`` gives a plain 16-bit model that ``save_pretrained`` /
    ``from_pretrained`` reload as is: the folded targets (never a re-quantised weight) and every
    other 4-bit linear dequantised, the transformers quantisation flags removed. Without ``fold``,
    the bnb ``Linear4bit`` that was injected comes back (or the NF4Linear of ``quantize="nf4"``).

    Raises:
        ValueError: with ``fold=True``, when a folded weight would be non-finite, a layer has the
            other adapter folded already (both name the layer), on an unknown ``adapter``, or
            ``"merged"`` before any task was merged (the model is left as it was).
    """
    layers = lora_layers(model)
    if fold:
        adapter = resolve_adapter(layers, adapter)
        for layer in layers.values():  # check every layer before changing any
            layer.check_fold(adapter)
    for name, layer in layers.items():
        if fold:
            layer.fold(adapter, safe=False)
        elif layer.folded:
            layer.unfold()
        base = layer.base
        model.set_submodule(name, base.restore() if isinstance(base, NF4Linear) else base)
    release_hooks(model)  # a strategy's past LoRAs or merged ΔW: on the layers just taken out
    if fold:
        _dequantize_rest(model)
    for attr in ("save_pretrained", "_keys_to_ignore_on_save"):  # what inject set on this instance
        model.__dict__.pop(attr, None)
    flags = getattr(model, "mbf_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for attr in ("mbf_lora_config", "mbf_requires_grad"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@torch.no_grad()
def _dequantize_rest(model: nn.Module) -> None:
    """Every 4-bit linear left in ``model`` becomes a 16-bit ``nn.Linear``; transformers' 4-bit flags go."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear) or is_bnb_linear4bit(module):
            nf4 = module if isinstance(module, NF4Linear) else NF4Linear.from_bnb(module, name=name)
            model.set_submodule(name, nf4.to_linear())
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        model.hf_quantizer, model.is_quantized = None, False
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
            model.__dict__.pop(flag, None)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes without any adapter (the base model), as PEFT's context.

    Raises:
        ValueError: a layer has an adapter folded into its weight (``unfold()`` it first).
    """
    layers = list(lora_layers(model).values())
    folded = [layer.layer_name for layer in layers if layer.folded]
    if folded:
        raise ValueError(f"{folded[0]}: an adapter is folded into the weight; unfold() before disabling it")
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print and return ``(trainable, total)`` parameter counts, PEFT's way.

    A 4-bit base weight counts as its ``out × in`` weights, not as the bytes that store them.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # bitsandbytes' Params4bit holds two 4-bit weights per uint8 element; NF4Linear keeps buffers
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
    return trainable, total

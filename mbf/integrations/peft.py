"""PEFT interop: import from PEFT's LoRA adapter format (``adapter_model.safetensors`` +
``adapter_config.json``; the export, ``save_peft_adapter``, lives in ``mbf.export``), and convert a live
``PeftModel``. peft itself is imported only by ``from_peft``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mbf.config import LoRAConfig
from mbf.export import save_peft_adapter
from mbf.inject import eject, inject, lora_layers
from mbf.io import load_safetensors

__all__ = ["from_peft", "load_peft_adapter", "lora_config_from_peft", "save_peft_adapter"]


# PEFT LoRA options whose adapter computes something else than y = x W0ᵀ + (alpha / r) x Aᵀ Bᵀ, or
# that carry state besides A and B: a loaded adapter would silently differ, so they are refused.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_rslora": "rsLoRA (scaling alpha / sqrt(r))",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "lora_bias": "a LoRA bias",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layers_to_transform": "layers_to_transform",
    "target_parameters": "target_parameters",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "megatron_config": "Megatron parallel layers",
    # LoRA variants (PEFT's ``is_lora_variant`` fields): each changes the forward or the state
    "kasa_config": "KaSA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}

# init_lora_weights values under which the saved adapter sits on the untouched base weights: they only
# draw A and B, which training then replaced ("mica" is a variant whose forward and merge are plain LoRA's)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "nora", "mica")
# init_lora_weights values that subtract the initial LoRA from the base weights (or quantise them):
# PEFT redoes it when it loads the adapter, so A and B on the untouched base compute something else
_BASE_CHANGING_INITS = ("pissa", "pissa_niter_", "olora", "corda", "astra", "loftq", "lora_ga")


def _check_init(value) -> None:
    """Refuse an ``init_lora_weights`` whose adapter does not compute ``W0 + s B A`` on the untouched base.

    Raises:
        ValueError: naming the field and the value.
    """
    if value is True or value is False or (isinstance(value, str) and value in _PLAIN_INITS):
        return
    if isinstance(value, str) and (value in _BASE_CHANGING_INITS or value.startswith("pissa_niter_")):
        raise ValueError(
            f"PEFT adapter uses init_lora_weights={value!r}, which changes the base weights (PEFT redoes it "
            "when it loads the adapter): A and B on the untouched base would compute something else; mbf "
            "cannot import it. Save it from PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) (a plain LoRA adapter), or fold it with "
            "merge_and_unload()"
        )
    raise ValueError(
        f"PEFT adapter uses init_lora_weights={value!r}, an initialisation mbf does not know "
        f"(it imports True, False, {', '.join(map(repr, _PLAIN_INITS))}); mbf cannot import it"
    )


def lora_config_from_peft(
    peft_config, *, quantize: str | None = None, backend: str = "auto", live: bool = False
) -> LoRAConfig:
    """mbf's ``LoRAConfig`` for a PEFT ``LoraConfig`` (or its ``adapter_config.json`` as a dict).

    ``live``: the config of a live ``PeftModel`` whose base weights are the ones its adapter computes
    with, whatever its ``init_lora_weights`` did to them (``from_peft``): the init is not checked.

    Raises:
        ValueError: not a LoRA config, a PEFT option mbf does not implement (DoRA, rsLoRA, an
            ``init_lora_weights`` that changes the base weights such as PiSSA or OLoRA, ...), or a null
            ``r`` / ``lora_alpha`` (the field and value are named).
    """
    d = peft_config if isinstance(peft_config, dict) else peft_config.to_dict()
    peft_type = str(d.get("peft_type", "LORA")).rpartition(".")[2].upper()
    if peft_type != "LORA":
        raise ValueError(f"PEFT adapter of type {d.get('peft_type')!r}: only LoRA adapters can be imported")
    for key, what in _UNSUPPORTED.items():
        if d.get(key):
            raise ValueError(f"PEFT adapter uses {what} ({key}={d[key]!r}); mbf cannot import it")
    if d.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapter trains biases (bias={d['bias']!r}); mbf cannot import it")
    if not live:
        _check_init(d.get("init_lora_weights", True))
    for key, what in (("r", "the LoRA rank"), ("lora_alpha", "the scaling's numerator")):
        if key not in d:
            raise ValueError(f"no {key!r} ({what}) in the PEFT adapter config")
        if d[key] is None:  # PEFT's defaults apply to an absent field only; PEFT itself fails on None / r
            raise ValueError(
                f"{key}=None ({what}): PEFT cannot load it either; give the value it was trained with"
            )
    targets = d.get("target_modules")
    if targets is None:
        raise ValueError("PEFT adapter config has no target_modules")
    if isinstance(targets, str):
        targets = "all-linear" if targets.lower() == "all-linear" else targets
    else:
        targets = tuple(sorted(targets))
    exclude = d.get("exclude_modules")
    exclude = tuple(sorted(exclude)) if exclude and not isinstance(exclude, str) else exclude or None
    return LoRAConfig(
        r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout") or 0.0,
        target_modules=targets, exclude_modules=exclude, quantize=quantize, backend=backend,
    )  # fmt: skip


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return load_safetensors(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no adapter_model.safetensors (or adapter_model.bin) PEFT adapter")


def _peft_key_to_ours(key: str) -> tuple[str, str]:
    """``base_model.model.<name>.lora_A[.default].weight`` → ``(<name>, "lora_A")``."""
    name = key.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        for suffix in (f".{part}.weight", f".{part}.default.weight"):
            if name.endswith(suffix):
                return name[: -len(suffix)], part
    raise ValueError(f"{key}: not a LoRA A/B tensor of a PEFT LoRA adapter")


@torch.no_grad()
def _copy_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """All or nothing: every layer's A and B are checked against the file before any is copied."""
    layers = lora_layers(model)
    found: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        name, part = _peft_key_to_ours(key)
        if name not in layers:
            raise ValueError(f"{where}: {key} has no LoRA layer {name!r} in this model")
        found[(name, part)] = t
    pairs = []
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            if (name, part) not in found:
                raise ValueError(f"{where}: no {part} for {name}")
            dst, src = getattr(layer, part), found[(name, part)]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{where}: {name}.{part} has shape {tuple(src.shape)}, the layer {tuple(dst.shape)}"
                )
            if not bool(torch.isfinite(src).all()):
                raise ValueError(f"{where}: {name}.{part} has non-finite values; not imported")
            pairs.append((dst, src))
    for dst, src in pairs:
        dst.copy_(src)


def _inject_and_copy(model: nn.Module, config: LoRAConfig, tensors: dict, where: str) -> nn.Module:
    inject(model, config)
    try:
        _copy_adapter(model, tensors, where)
    except BaseException:
        eject(model)
        raise
    return model


def load_peft_adapter(
    model: nn.Module, path: str | Path, *, quantize: str | None = None, backend: str = "auto"
) -> nn.Module:
    """Inject LoRA layers configured as a saved PEFT LoRA adapter and load it as the fine-tuned adapter.

    The model computes what ``PeftModel.from_pretrained(model, path)`` computes. To continue with
    SLAO from it, count it as task 1: ``cl = mbf.ContinualLoRA(model); cl.begin_task(); cl.end_task()``.

    Args:
        model: the base model the adapter was trained on, without LoRA layers.
        path: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        quantize: ``"nf4"`` to put the targets' base weights in NF4 (QLoRA).

    Raises:
        FileNotFoundError: no PEFT adapter at ``path``.
        ValueError: an option mbf does not implement, or tensors that do not fit the model (all
            named); the model is left as it was.
    """
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = lora_config_from_peft(raw, quantize=quantize, backend=backend)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    except (AttributeError, TypeError, ValueError) as err:  # AttributeError: not a JSON object
        raise ValueError(f"{config_file}: {err}") from err
    return _inject_and_copy(model, config, _adapter_tensors(path), str(path))


def from_peft(peft_model, *, backend: str = "auto") -> nn.Module:
    """Convert a ``PeftModel`` with one LoRA adapter to the base model with mbf's LoRA layers.

    The PEFT layers are removed (``unload``, nothing folded) and the adapter becomes the fine-tuned
    adapter of mbf's layers; a bitsandbytes 4-bit base stays 4-bit (viewed zero-copy). The base keeps
    the weights the PeftModel had: after an init that changes them (PiSSA, OLoRA, ...) the residual
    ones, so the model computes what the PeftModel computed.

    Raises:
        TypeError: not a ``PeftModel``.
        ValueError: several adapters, or an option mbf does not implement.
    """
    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError as err:
        raise ImportError("mbf.from_peft needs peft: pip install mbf-lora[app]") from err
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"from_peft expects a peft.PeftModel, got {type(peft_model).__name__}")
    if len(peft_model.peft_config) != 1:
        raise ValueError(f"PeftModel has adapters {sorted(peft_model.peft_config)}; convert one at a time")
    (adapter,) = peft_model.peft_config
    # live: the base weights are the ones the adapter computes with, even after PiSSA or OLoRA changed them
    config = lora_config_from_peft(peft_model.peft_config[adapter], backend=backend, live=True)
    tensors = {
        k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
    }
    base = peft_model.unload()
    return _inject_and_copy(base, config, tensors, f"PeftModel adapter {adapter!r}")

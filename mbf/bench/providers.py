"""The layers mbf is measured against: PEFT's LoRA, and bitsandbytes' NF4 linear under it."""

from __future__ import annotations

import torch
from torch import nn

from mbf._optional import require

__all__ = ["bnb_nf4_linear", "peft_lora"]


def peft_lora(base: nn.Module, r: int, four_bit: bool = False, dropout: float = 0.0) -> nn.Module:
    """PEFT's LoRA (``lora_alpha = 2r``) on one linear, wrapped as the module ``proj``.

    Args:
        base: an ``nn.Linear`` or a bitsandbytes ``Linear4bit``.
        r: the rank.
        four_bit: ``base`` is a ``Linear4bit``: PEFT then uses its bitsandbytes LoRA layer.
        dropout: PEFT's ``lora_dropout`` (active while the model is in train mode).

    Returns:
        The PEFT model; call it on ``x (..., in)``.
    """
    require("the PEFT rows of mbf.bench", ("peft",))
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    if four_bit:
        wrapper.is_loaded_in_4bit = True
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"])
    return get_peft_model(wrapper, config)


def bnb_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (NF4, double quantisation) of ``linear``, quantised on its device.

    Raises:
        ImportError: when bitsandbytes is not installed (``pip install 'mbf-lora[qlora]'``).
    """
    from mbf.nf4 import make_linear4bit

    return make_linear4bit(linear, compute_dtype)

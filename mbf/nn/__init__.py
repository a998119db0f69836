"""The modules of mbf: ``LoRALinear`` (a linear with SLAO's two adapters, over a dense or NF4 base)
and ``NF4Linear`` (a frozen 4-bit linear in bitsandbytes' layout, QLoRA's base); ``mbf.nn.model``
finds them in a model."""

from mbf.nn.lora import LoRALinear
from mbf.nn.model import inference_adapter, linear_names, lora_layers, resolve_adapter
from mbf.nn.nf4 import NF4Linear

__all__ = ["LoRALinear", "NF4Linear", "inference_adapter", "linear_names", "lora_layers", "resolve_adapter"]

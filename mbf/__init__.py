"""mbf-lora: continual fine-tuning of Llama models with one LoRA adapter (SLAO, Merge before Forget)."""

from mbf import functional, nf4
from mbf.config import LoRAConfig
from mbf.export import save_peft_adapter
from mbf.inject import disable_adapter, eject, inject, lora_layers, print_trainable_parameters
from mbf.integrations.peft import from_peft, load_peft_adapter
from mbf.nn import LoRALinear, NF4Linear
from mbf.strategies.slao import ContinualConfig, ContinualLoRA

__version__ = "0.1.0"

__all__ = [
    "ContinualConfig",
    "ContinualLoRA",
    "LoRAConfig",
    "LoRALinear",
    "NF4Linear",
    "disable_adapter",
    "eject",
    "from_peft",
    "functional",
    "inject",
    "load_peft_adapter",
    "lora_layers",
    "nf4",
    "print_trainable_parameters",
    "save_peft_adapter",
]

"""mbf-lora: continual fine-tuning of Llama models with one LoRA adapter (SLAO, Merge before Forget)."""

from mbf._checkout import prefer_installed_kernels

prefer_installed_kernels()  # before anything imports transformers (see mbf/_checkout.py)

from mbf import functional, nf4, reference  # noqa: E402
from mbf.config import ContinualConfig, LoRAConfig  # noqa: E402
from mbf.continual import ContinualLoRA  # noqa: E402
from mbf.export import save_peft_adapter  # noqa: E402
from mbf.inject import disable_adapter, eject, inject, lora_layers, print_trainable_parameters  # noqa: E402
from mbf.integrations.peft import from_peft, load_peft_adapter  # noqa: E402
from mbf.nn import LoRALinear, NF4Linear  # noqa: E402

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
    "reference",
    "save_peft_adapter",
]

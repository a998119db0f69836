"""Bridges to the ecosystem: PEFT's adapter format (more to come: transformers Trainer, distributed).

Each module imports its third-party package lazily, so ``import mbf`` never needs it.
"""

from mbf.integrations.peft import from_peft, load_peft_adapter, lora_config_from_peft, save_peft_adapter

__all__ = ["from_peft", "load_peft_adapter", "lora_config_from_peft", "save_peft_adapter"]

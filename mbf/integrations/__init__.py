"""Bridges to the ecosystem: PEFT's adapter format (more to come: transformers Trainer, distributed).

Each module imports its third-party package lazily, so ``import mbf`` never needs it.
"""

from mbf.integrations.peft import save_peft_adapter

__all__ = ["save_peft_adapter"]

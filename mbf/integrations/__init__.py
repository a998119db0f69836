"""Bridges to the ecosystem: PEFT's adapter format in (``peft.py``; out: ``mbf.export``, re-exported
here) and the transformers Trainer (``trainer.py``: ``ContinualCallback`` for any strategy,
``SLAOCallback`` its former name, and ``adapters_attached``).

Third-party packages are imported lazily: ``import mbf`` never needs them, and
``from mbf.integrations import ContinualCallback`` is what imports transformers.
"""

from mbf.integrations.peft import from_peft, load_peft_adapter, lora_config_from_peft, save_peft_adapter

__all__ = [
    "ContinualCallback",
    "SLAOCallback",
    "adapters_attached",
    "from_peft",
    "load_peft_adapter",
    "lora_config_from_peft",
    "save_peft_adapter",
]


def __getattr__(name: str):
    if name in ("ContinualCallback", "SLAOCallback", "adapters_attached"):
        from mbf.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'mbf.integrations' has no attribute {name!r}")

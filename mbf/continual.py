"""Where ``ContinualLoRA`` and ``ContinualConfig`` were: SLAO now lives beside the other strategies, in
``mbf.strategies.slao``. The names stay importable from here (and as ``mbf.ContinualLoRA``)."""

from mbf.strategies.slao import EVAL_ADAPTERS, INITS, ContinualConfig, ContinualLoRA

__all__ = ["EVAL_ADAPTERS", "INITS", "ContinualConfig", "ContinualLoRA"]

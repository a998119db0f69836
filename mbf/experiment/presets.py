"""Training presets: ``--preset quick`` (this package's CPU-sized default) and ``--preset paper``.

``paper`` is the paper's setting as it states it: LoRA r = 8 on q_proj and v_proj, learning rate 1e-4,
one epoch, batch 1 with 8 gradient-accumulation steps for the standard and long sequences; for
SuperNI-style generation tasks (a suite whose every task is scored by Rouge-L) learning rate 5e-5,
batch 2 × 4 accumulation, 5 epochs. What the paper does not state here (alpha, warm-up, dropout,
weight decay, prompt length) keeps this package's defaults. ``quick`` trains 20 steps of batch 8 at
learning rate 1e-3 per task: what a 2-core CPU can run in minutes, not the paper's regime.
An option given on the command line always wins over its preset's value.
"""

from __future__ import annotations

__all__ = ["PRESETS", "preset_values", "resolve"]

_COMMON = dict(
    epochs=1.0, warmup_steps=3, weight_decay=0.0, lora_dropout=0.0, r=8, alpha=16.0,
    target_modules="q_proj,v_proj", max_length=256,
)  # fmt: skip
PRESETS: dict[str, dict] = {
    "quick": {**_COMMON, "lr": 1e-3, "max_steps": 20, "batch_size": 8, "grad_accum": 1},
    "paper": {**_COMMON, "lr": 1e-4, "max_steps": 0, "batch_size": 1, "grad_accum": 8},
    # chosen by --preset paper when every task of the suite is a generation task (Rouge-L)
    "paper-superni": {**_COMMON, "lr": 5e-5, "max_steps": 0, "batch_size": 2, "grad_accum": 4, "epochs": 5.0},
}


def preset_values(preset: str, generation: bool = False) -> tuple[str, dict]:
    """``(name, values)`` of ``preset``; ``paper`` on an all-generation suite is ``paper-superni``.

    Raises:
        ValueError: on an unknown preset.
    """
    if preset not in ("quick", "paper"):
        raise ValueError(f"unknown preset {preset!r}; choose quick or paper")
    name = "paper-superni" if preset == "paper" and generation else preset
    return name, PRESETS[name]


def resolve(given: dict, preset: str, generation: bool = False) -> tuple[str, dict]:
    """The preset's values with every non-None entry of ``given`` (the command line) on top.

    Returns:
        ``(preset name applied, values)``.
    """
    name, values = preset_values(preset, generation)
    return name, {**values, **{k: v for k, v in given.items() if v is not None and k in values}}

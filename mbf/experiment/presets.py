"""Training presets: ``--preset quick`` (this package's CPU-sized default) and ``--preset paper``.

A preset is a frozen ``Preset``: a name, the ``TrainOptions`` of each task and the ``LoRAConfig`` it
trains. Each states only what it changes from those classes' defaults, which are written once, there.

``paper`` is the paper's setting as it states it: LoRA r = 8 on q_proj and v_proj, learning rate 1e-4,
one epoch, batch 1 with 8 gradient-accumulation steps for the standard and long sequences; for
SuperNI-style generation tasks (a suite whose every task is scored by Rouge-L) learning rate 5e-5,
batch 2 × 4 accumulation, 5 epochs. What the paper does not state here (alpha, warm-up, dropout,
weight decay, prompt length) keeps this package's defaults. ``quick`` trains 20 steps of batch 8 at
learning rate 1e-3 per task: what a 2-core CPU can run in minutes, not the paper's regime.
An option given on the command line always wins over its preset's value (``Preset.with_values``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from mbf.config import LoRAConfig
from mbf.experiment.train import TrainOptions

__all__ = ["PRESETS", "Preset", "preset"]


@dataclass(frozen=True)
class Preset:
    """A named training setting."""

    name: str  # results.json's "preset"
    train: TrainOptions  # how each task is trained and evaluated
    lora: LoRAConfig  # the adapter (r 8 on q_proj and v_proj: LoRAConfig's defaults)

    def with_values(self, **given) -> Preset:
        """This preset with every non-None ``given`` value on top: ``TrainOptions`` fields by their names,
        ``LoRAConfig`` fields by theirs (``r``, ``alpha``, ``dropout``, ``target_modules``, ``quantize``).

        Raises:
            ValueError: on a name neither class has, or a value either refuses (naming the field).
        """
        given = {k: v for k, v in given.items() if v is not None}
        train_keys = {f.name for f in fields(TrainOptions)}
        lora_keys = {f.name for f in fields(LoRAConfig)}
        unknown = set(given) - train_keys - lora_keys
        if unknown:
            raise ValueError(f"preset {self.name}: unknown option(s) {', '.join(sorted(unknown))}")
        train = replace(self.train, **{k: v for k, v in given.items() if k in train_keys})
        lora = replace(self.lora, **{k: v for k, v in given.items() if k in lora_keys})
        return replace(self, train=train, lora=lora)


_PAPER = TrainOptions(lr=1e-4, batch_size=1, grad_accum=8)  # one epoch, no step cap
PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", TrainOptions(max_steps=20), LoRAConfig()),
    "paper": Preset("paper", _PAPER, LoRAConfig()),
    # chosen by --preset paper when every task of the suite is a generation task (Rouge-L)
    "paper-superni": Preset(
        "paper-superni", replace(_PAPER, lr=5e-5, batch_size=2, grad_accum=4, epochs=5.0), LoRAConfig()
    ),
}


def preset(name: str, generation: bool = False) -> Preset:
    """The preset called ``name``; ``paper`` on an all-generation suite is ``paper-superni``.

    Raises:
        ValueError: on an unknown preset.
    """
    if name not in ("quick", "paper"):
        raise ValueError(f"unknown preset {name!r}; choose quick or paper")
    return PRESETS["paper-superni" if name == "paper" and generation else name]

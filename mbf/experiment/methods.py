"""Method presets: the name given to ``mbf continual --method`` → the ``ContinualConfig`` it runs.

``slao`` and its ablations are ContinualLoRA configurations; ``seq-lora`` is one LoRA fine-tuned on
and on (no QR, λ ≡ 1: the merged adapter is the fine-tuned one); ``multi-task`` (``None``) trains one
LoRA on all tasks' data at once, the upper bound, evaluated once at the end.

The paper's merge-strategy ablations are named as in the paper: FTBA / FREA / FREB = fine-tune both
factors / freeze A / freeze B, MB / MA / MBA = merge B / A / both with λ(i) = 1/√i. They start each
task from the previous task's adapter as it is (``init="none"``: no orthogonal init), so that they
isolate the merge; ``slao`` is FTBA-MB plus the orthogonal init. ``slao-random`` re-initialises the
adapter for every task (the paper's random-init ablation). ``slao-inverse``, ``slao-constant``,
``slao-last-merge`` and ``orthogonal_updates`` are this package's own extensions, not the paper's.
"""

from __future__ import annotations

from dataclasses import replace

from mbf.config import ContinualConfig

__all__ = ["EXTENSIONS", "METHODS", "PAPER_ABLATIONS", "method_config", "method_label"]

METHODS: dict[str, ContinualConfig | None] = {
    "slao": ContinualConfig(init="orthogonal", schedule="sqrt"),
    "seq-lora": ContinualConfig(init="none", schedule="none"),
    # the paper's merge-strategy ablations (train: factors fine-tuned; merged_factors: merged with λ)
    "ftba-mb": ContinualConfig(init="none", schedule="sqrt", train="AB", merged_factors="B"),
    "ftba-mba": ContinualConfig(init="none", schedule="sqrt", train="AB", merged_factors="AB"),
    "ftba-ma": ContinualConfig(init="none", schedule="sqrt", train="AB", merged_factors="A"),
    "frea-mb": ContinualConfig(init="none", schedule="sqrt", train="B", merged_factors="B"),
    "freb-ma": ContinualConfig(init="none", schedule="sqrt", train="A", merged_factors="A"),
    "slao-random": ContinualConfig(init="random", schedule="sqrt"),
    # this package's extensions (not in the paper)
    "slao-inverse": ContinualConfig(init="orthogonal", schedule="inverse"),
    "slao-constant": ContinualConfig(init="orthogonal", schedule="constant"),
    "slao-last-merge": ContinualConfig(init="last_merge", schedule="sqrt"),
    "multi-task": None,
}
PAPER_ABLATIONS = ("ftba-mb", "ftba-mba", "frea-mb", "ftba-ma", "freb-ma")  # the paper's expected order
EXTENSIONS = ("slao-inverse", "slao-constant", "slao-last-merge")


def method_config(
    method: str,
    *,
    init: str | None = None,
    schedule: str | None = None,
    constant: float | None = None,
    orthogonal_updates: bool | None = None,
) -> ContinualConfig | None:
    """The configuration of ``method`` with the ``init`` / ``schedule`` / ``constant`` /
    ``orthogonal_updates`` overrides applied (None: the preset's).

    Returns:
        A ``ContinualConfig``, or None for ``multi-task`` (not a ContinualLoRA sequence; a ``constant``
        given to it is ignored, as there is no merge).

    Raises:
        ValueError: on an unknown method, an init or schedule given to ``multi-task``, or an invalid
            override (``ContinualConfig`` names it).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = METHODS[method]
    if preset is None:
        if init or schedule or orthogonal_updates:
            raise ValueError(
                "multi-task trains one adapter once: --init/--schedule/--orthogonal-updates do not apply"
            )
        return None
    overrides = {
        "init": init,
        "schedule": schedule,
        "constant": constant,
        "orthogonal_updates": orthogonal_updates,
    }
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def method_label(method: str, options: dict | None) -> str:
    """``method``, followed by what its run's options changed from the preset.

    ``"slao (orthogonal, inverse)"`` for ``--method slao --schedule inverse``: runs whose options
    differ are never grouped together as seeds of one method.

    Args:
        method: the run's method name.
        options: the run's ``ContinualConfig.to_dict()`` (results.json ``"options"``), or None.
    """
    preset = METHODS.get(method)
    if preset is None or options is None:
        return method
    config = ContinualConfig.from_dict(options)  # fields absent from older results take their defaults
    if (config.init, config.schedule) == (preset.init, preset.schedule):
        changed = []
    else:
        changed = [config.init, config.schedule]
    if config.constant != preset.constant and config.schedule == "constant":
        changed.append(f"λ={config.constant:g}")
    if config.orthogonal_updates != preset.orthogonal_updates:
        changed.append("orthogonal updates" if config.orthogonal_updates else "free updates")
    return f"{method} ({', '.join(changed)})" if changed else method

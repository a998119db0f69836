"""Method presets: the name given to ``mbf continual --method`` → the strategy config it runs.

A preset is a strategy's frozen config (``mbf.strategies``: the config's class names the strategy that
runs it): a ``ContinualConfig`` (SLAO and its ablations, ``mbf.ContinualLoRA``), an ``OLoRAConfig``
(``o-lora``), an ``InfLoRAConfig`` (``inflora``), ... results.json records its fields as ``"options"``.

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

from dataclasses import fields, replace
from typing import Any

from mbf.strategies.inflora import InfLoRAConfig
from mbf.strategies.olora import OLoRAConfig
from mbf.strategies.replay import ReplayConfig
from mbf.strategies.sketch import SketchMergeConfig
from mbf.strategies.slao import ContinualConfig
from mbf.strategies.task_merge import TaskMergeConfig

__all__ = ["BASELINES", "EXTENSIONS", "METHODS", "PAPER_ABLATIONS", "method_config", "method_label",
           "normalised_options", "with_run_seed"]  # fmt: skip

METHODS: dict[str, Any] = {
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
    # the methods SLAO is measured against, each its own strategy (mbf.strategies)
    "o-lora": OLoRAConfig(),
    "inflora": InfLoRAConfig(),
    "task-arithmetic": TaskMergeConfig(merge="task_arithmetic"),  # one LoRA per task, merged (λ 0.4)
    "ties": TaskMergeConfig(merge="ties"),  # one LoRA per task, TIES-merged (k 20%, λ 1)
    "replay": ReplayConfig(),  # sequential LoRA + 2% of each task's examples replayed (uses data)
    # this package's constant-memory method: InfLoRA's design against a bounded input sketch, all past tasks
    # in one merged adapter of rank <= 16 (mbf.strategies.sketch)
    "sketch-merge": SketchMergeConfig(),
    "multi-task": None,
}
PAPER_ABLATIONS = ("ftba-mb", "ftba-mba", "frea-mb", "ftba-ma", "freb-ma")  # the paper's expected order
EXTENSIONS = ("slao-inverse", "slao-constant", "slao-last-merge", "sketch-merge")
BASELINES = ("o-lora", "inflora", "task-arithmetic", "ties", "replay")  # other papers' methods, here


def method_config(
    method: str,
    *,
    init: str | None = None,
    schedule: str | None = None,
    constant: float | None = None,
    orthogonal_updates: bool | None = None,
    options: dict[str, str] | None = None,
) -> Any:
    """The configuration of ``method`` with the ``init`` / ``schedule`` / ``constant`` /
    ``orthogonal_updates`` overrides (SLAO's and its ablations') and ``options`` (any field of the
    method's config, as text: ``mbf continual --option NAME=VALUE``) applied (None: the preset's).

    Returns:
        The method's strategy config, or None for ``multi-task`` (not a continual sequence; a
        ``constant`` given to it is ignored, as there is no merge).

    Raises:
        ValueError: on an unknown method, an init or schedule given to ``multi-task`` or to another
            strategy than SLAO's, an unknown option or a value it refuses (the config names it).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = METHODS[method]
    if preset is None:
        if init or schedule or orthogonal_updates or options:
            raise ValueError(
                "multi-task trains one adapter once: --init/--schedule/--orthogonal-updates/--option do not "
                "apply"
            )
        return None
    overrides = {
        "init": init,
        "schedule": schedule,
        "constant": constant,
        "orthogonal_updates": orthogonal_updates,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if given and not isinstance(preset, ContinualConfig):
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ValueError(f"{flags}: SLAO's options, not {method}'s (its own: --option NAME=VALUE)")
    return replace(preset, **{**_parsed(method, preset, options or {}), **given})  # a flag wins


def _parsed(method: str, preset: Any, options: dict[str, str]) -> dict:
    """``--option`` values converted to the type of the config field they set."""
    types = {f.name: type(getattr(preset, f.name)) for f in fields(preset)}
    out = {}
    for name, text in options.items():
        if name == "seed" and name in types:  # with_run_seed would overwrite it without a word
            raise ValueError(f"--option seed={text}: {method}'s seed is the run's; give --seed {text}")
        if name not in types:
            raise ValueError(f"--option {name}={text}: {method} has no option {name!r}; its options: "
                             f"{', '.join(types)}")  # fmt: skip
        kind = types[name]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                out[name] = text.lower() == "true"
            else:
                out[name] = kind(text)
        except ValueError:
            raise ValueError(f"--option {name}={text}: {name} takes a {kind.__name__}") from None
    return out


def normalised_options(method: str, options: dict | None) -> dict | None:
    """A run's recorded ``options`` with the defaults of fields an older file lacks (unknown method:
    as recorded)."""
    preset = METHODS.get(method)
    if options is None or preset is None:
        return options
    return type(preset).from_dict(options).to_dict()


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
    config = type(preset).from_dict(options)  # fields absent from older results take their defaults
    if not isinstance(preset, ContinualConfig):  # a config's seed is the run's (with_run_seed): a replication
        changed = [f"{k}={v}" for k, v in config.to_dict().items() if v != getattr(preset, k) and k != "seed"]
        return f"{method} ({', '.join(changed)})" if changed else method
    if (config.init, config.schedule) == (preset.init, preset.schedule):
        changed = []
    else:
        changed = [config.init, config.schedule]
    if config.constant != preset.constant and config.schedule == "constant":
        changed.append(f"λ={config.constant:g}")
    if config.orthogonal_updates != preset.orthogonal_updates:
        changed.append("orthogonal updates" if config.orthogonal_updates else "free updates")
    return f"{method} ({', '.join(changed)})" if changed else method


def with_run_seed(config: Any, seed: int) -> Any:
    """``config`` with its ``seed`` field (a strategy that draws, e.g. replay's buffer) set to the run's
    seed, so that seeds replicate the whole method; a config without one, or None, as it is."""
    if config is None or "seed" not in {f.name for f in fields(config)}:
        return config
    return replace(config, seed=seed)

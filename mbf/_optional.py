"""Optional dependencies of the application half (``mbf.experiment``, ``mbf.bench``, the ``mbf`` command).

The library core needs torch (+ triton) and safetensors only; what the application adds comes with
the ``app`` extra. A missing one is reported in one line naming the command that installs it, before
any work starts, instead of as a traceback from deep inside a run.
"""

from __future__ import annotations

import importlib.util

__all__ = ["APP", "BENCH", "EXPERIMENT", "MissingDependency", "pyplot", "require"]

# import names installed by `pip install mbf-lora[app]`
APP = ("transformers", "peft", "tqdm", "matplotlib", "gguf")
EXPERIMENT = ("transformers", "tqdm", "matplotlib")  # what mbf.experiment and the mbf command import
# mbf.bench's import; PEFT is imported (and required) only where a PEFT row is measured, so a machine
# without peft (a GPU image, say) still measures every other row
BENCH = EXPERIMENT


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the pip command that installs it."""


def require(user: str, modules: tuple[str, ...] = APP, extra: str = "app") -> None:
    """Check that ``modules`` are importable, without importing them.

    Args:
        user: who needs them, for the message (``"mbf.experiment"``).
        modules: import names to look for.
        extra: the mbf-lora extra that installs them.

    Raises:
        MissingDependency: naming every missing module and ``pip install 'mbf-lora[<extra>]'``.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"{user} needs {', '.join(missing)}: pip install 'mbf-lora[{extra}]'")


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed).

    Raises:
        MissingDependency: when matplotlib is not installed.
    """
    require("plotting", ("matplotlib",))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

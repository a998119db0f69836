"""Imports point one way (issue 38): the float64 spec is the tests', never the package's; no lower layer
imports a higher one; the names that moved still work from where they were."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mbf

ROOT = Path(__file__).resolve().parents[1]
APPLICATION = ("mbf.experiment", "mbf.cli", "mbf.bench")
# the library core below the strategies: none of it may import a strategy, SLAO's old home or the application
LOWER = ("mbf.closed_form", "mbf.config", "mbf.io", "mbf.distributed", "mbf.checkpoint", "mbf.kernels",
         "mbf.functional", "mbf.nf4", "mbf.nn", "mbf.inject", "mbf.export")  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every mbf module ``path`` imports, at the top or inside a function (``from mbf import x``: mbf.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module) if node.module != "mbf" else None  # from mbf import x: mbf.x alone
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name == "mbf" or name.startswith("mbf.")}


IMPORTS = {_module(p): _imports(p) for p in sorted((ROOT / "mbf").rglob("*.py"))}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _top_level_name(name: str) -> bool:
    """``mbf.X`` where X is a name the package's __init__ defines, not a module of it."""
    return name.count(".") == 1 and not any(m == name or m.startswith(name + ".") for m in IMPORTS)


def test_no_module_of_the_package_imports_the_spec():
    found = [m for m, names in IMPORTS.items() if m != "mbf.reference" and "mbf.reference" in names]
    assert not found


def test_no_lower_layer_imports_a_higher_one():
    upward = {m: sorted(n for n in names if _under(n, ("mbf.strategies", "mbf.continual", "mbf.integrations",
                                                          *APPLICATION)))
              for m, names in IMPORTS.items() if _under(m, LOWER)}  # fmt: skip
    assert not {m: n for m, n in upward.items() if n}
    # the package's __init__ imports the strategies: they take nothing from it (``import mbf``, ``from mbf
    # import ContinualLoRA``), only its modules
    top = {n for names in IMPORTS.values() for n in names if n == "mbf" or _top_level_name(n)}
    strategies = {m: sorted(n for n in names if _under(n, ("mbf.continual", "mbf.integrations", *APPLICATION))
                            or n in top)
                  for m, names in IMPORTS.items() if _under(m, ("mbf.strategies",))}  # fmt: skip
    assert not {m: n for m, n in strategies.items() if n}
    assert IMPORTS["mbf.closed_form"] == set()  # the bottom: torch alone


def test_training_with_every_strategy_never_loads_the_spec():
    """A fresh interpreter: ``import mbf``, then SLAO, InfLoRA and sketch-merge over two tasks each."""
    code = """
import sys
from collections import OrderedDict
import torch
import mbf
from mbf.strategies import InfLoRA, SketchMerge, loop

for cls in (mbf.ContinualLoRA, InfLoRA, SketchMerge):
    model = torch.nn.Sequential(OrderedDict(q_proj=torch.nn.Linear(16, 16), v_proj=torch.nn.Linear(16, 16)))
    mbf.inject(model, mbf.LoRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    cl = cls(model) if cls is not SketchMerge else cls(model, rank=2, sketch=4)
    x = torch.randn(5, 16)
    for i in range(2):
        loop.open_task(cl, lambda: model(x))
        with torch.no_grad():
            for p in cl.trainable_parameters():
                p.add_(0.1 * torch.randn_like(p))
        cl.after_step()
        loop.close_task(cl, lambda: model(x))
print("mbf.reference" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_slao_moved_beside_the_strategies_and_its_old_names_still_work():
    from mbf import continual
    from mbf.strategies import ContinualLoRA, slao

    assert mbf.ContinualLoRA is continual.ContinualLoRA is ContinualLoRA is slao.ContinualLoRA
    assert mbf.ContinualConfig is continual.ContinualConfig is slao.ContinualConfig
    assert ContinualLoRA.__module__ == "mbf.strategies.slao" and ContinualLoRA.strategy_name == "slao"
    from mbf import closed_form

    moved = [("ContinualConfig", slao), ("INITS", slao), ("FACTORS", slao), ("SCHEDULES", closed_form)]
    for name, home in moved:
        with pytest.warns(DeprecationWarning, match=rf"mbf\.config\.{name} moved to {home.__name__}\.{name}"):
            value = getattr(__import__("mbf.config", fromlist=[name]), name)
        assert value is getattr(home, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from mbf.config import LoRAConfig  # what stays in mbf.config does not warn

        assert LoRAConfig is mbf.LoRAConfig
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        from mbf.config import Nope  # noqa: F401

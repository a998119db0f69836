"""Paired confidence intervals of ``mbf compare``: each method's AA, BWT, FWT, LA and per-task final
score, and its difference against a baseline method, from the runs' saved per-example predictions.

A unit is one replication (order, seed): two methods are paired on the units both ran, whose test
examples are the same (same data fingerprint). ``stats.paired_bootstrap`` draws the units and, inside
each, the test examples of each task, the same draw for every score of that task. Per example (and
paired, on the same examples): AA's term is the final score; BWT's the final minus the diagonal
score (every task but the order's last); FWT's the score before training minus the bare model's
(every task but the first); LA's the diagonal score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbf.experiment import predictions
from mbf.experiment import results as results_file
from mbf.experiment.stats import Interval, paired_bootstrap

__all__ = ["METRICS", "compare_intervals", "to_json"]

METRICS = ("AA", "BWT", "FWT", "LA")


def _unit(run_dir: Path, results: dict, scorer: str) -> dict[str, dict[str, np.ndarray]] | None:
    """Per task, the per-example terms of each metric (``"AA"``, ``"BWT"``... and ``"final"``)."""
    loaded = predictions.load_run(run_dir, results, scorer)
    if loaded is None:
        return None
    order = results["tasks"]
    unit = {}
    for j, t in enumerate(order):
        v = {k: np.asarray(a, dtype=np.float64) for k, a in loaded[t].items()}
        terms = {"AA": v["final"]}
        if "diag" in v:
            terms["LA"] = v["diag"]
            if j < len(order) - 1:
                terms["BWT"] = v["final"] - v["diag"]
        if "next" in v and "zero" in v:
            terms["FWT"] = v["next"] - v["zero"]
        unit[t] = terms
    return unit


def _mean_over_tasks(means: dict, key: str, tasks: list[str] | None = None) -> np.ndarray:
    cols = [m[key] for t, m in means.items() if key in m and (tasks is None or t in tasks)]
    return np.mean(cols, axis=0)


def _has(units: list[dict], key: str) -> bool:
    return all(any(key in terms for terms in u.values()) for u in units)


def _intervals(units: list[dict], tasks: list[str], diff: bool, **kw) -> dict:
    """Every metric and per-task final score over ``units`` (with ``diff``: their ``a:``/``b:`` terms'
    difference)."""

    def stat(key: str, only: list[str] | None = None):
        if not diff:
            return lambda means: _mean_over_tasks(means, key, only)
        return lambda means: (
            _mean_over_tasks(means, f"a:{key}", only) - _mean_over_tasks(means, f"b:{key}", only)
        )

    name = (lambda k: f"a:{k}") if diff else (lambda k: k)
    out: dict = {"units": len(units)}
    for key in METRICS:  # a metric a side lacks (multi-task's BWT) has no interval
        have = _has(units, name(key)) and (not diff or _has(units, f"b:{key}"))
        out[key] = paired_bootstrap(units, stat(key), **kw) if have else None
    out["tasks"] = {t: paired_bootstrap(units, stat("AA", [t]), **kw) for t in tasks}
    return out


def _key(results: dict) -> tuple:
    """What must agree for two runs to be paired: the order, the seed and the data."""
    return (tuple(results["tasks"]), results.get("seed"), results.get("data_fingerprint"))


def compare_intervals(
    groups: dict[str, list[tuple[Path, dict]]],
    baseline: str | None,
    *,
    scorer: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Paired-bootstrap intervals per method, and of each method minus ``baseline`` on the units both ran.

    Args:
        groups: label -> (run dir, results) of its complete runs (one per order and seed).
        baseline: the label (or method name) differences are taken against; None: none.
        scorer: whose saved predictions to pair ("generate" or "rank"); None: the runs' headline (exact-match
            generation when they recorded both).

    Returns:
        ``{"scorer", "level", "n_boot", "methods": {label: {"units", "AA", "BWT", "FWT", "LA",
        "tasks": {task: Interval}}}, "baseline", "vs_baseline": {label: the same, of the difference}}``
        (an ``Interval`` or None where the metric does not apply); a method whose runs lack saved
        predictions is left out and named in ``"missing"``.
    """
    first = next(iter(groups.values()))[0][1]
    scorer = scorer or results_file.headline(results_file.scoring(first))
    tasks = list(first["tasks"])
    kw = {"n_boot": n_boot, "seed": seed}
    out: dict = {"scorer": scorer, "level": 0.95, "n_boot": n_boot, "methods": {}, "missing": [],
                 "baseline": None, "vs_baseline": {}}  # fmt: skip
    units: dict[str, dict[tuple, dict]] = {}
    for label, runs in groups.items():
        made = {_key(r): _unit(Path(p), r, scorer) for p, r in runs}
        if any(u is None for u in made.values()):
            out["missing"].append(label)
            continue
        units[label] = made
        out["methods"][label] = _intervals(list(made.values()), tasks, diff=False, **kw)
    base = next((lb for lb in units if lb == baseline or lb.split(" ")[0] == baseline), None)
    if base is None:
        return out
    out["baseline"] = base
    for label, made in units.items():
        shared = [k for k in made if k in units[base]]
        if label == base or not shared:
            continue
        pairs = []
        for k in shared:
            a, b = made[k], units[base][k]
            tagged = lambda side, terms: {f"{side}:{n}": v for n, v in terms.items()}  # noqa: E731
            pairs.append({t: {**tagged("a", a[t]), **tagged("b", b[t])} for t in a})
        out["vs_baseline"][label] = _intervals(pairs, tasks, diff=True, **kw)
    return out


def to_json(intervals: dict) -> dict:
    """``compare_intervals``' result with every ``Interval`` as a dict."""

    def conv(x):
        if isinstance(x, Interval):
            return x.to_dict()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(intervals)

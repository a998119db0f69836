"""Reports: a run's ``results.md`` and ``accuracy.png``, and ``compare.md`` / ``compare.png`` over runs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from mbf.experiment import results as results_file
from mbf.experiment.methods import METHODS, method_label
from mbf.experiment.metrics import mean_std, pct
from mbf.experiment.plots import compare_figure, heatmap
from mbf.io import atomic_write_text

__all__ = ["compare_runs", "run_markdown", "write_run"]

# settings that make two runs of one method different experiments rather than two seeds of one
_SETTINGS = ("model", "dtype", "suite_seed", "n_train", "n_test", "train", "lora")


# -- one run ---------------------------------------------------------------------------------------


def run_markdown(results: dict) -> str:
    """The accuracy matrix as a markdown table, with each stage's steps, seconds and memory."""
    tasks, acc = results["tasks"], results["accuracy"]
    m, lora = results["metrics"], results["lora"]
    lines = [
        f"# {results['method']} on {results.get('suite', '?')} (seed {results['seed']})",
        "",
        f"model: {results.get('model', '?')} ({results_file.base_dtype(results)}); "
        f"options: {results.get('options')}; "
        f"LoRA r={lora['r']} alpha={lora['alpha']} on {', '.join(lora['target_modules'])}",
        "",
        f"**AA {pct(m['AA'])}%, BWT {pct(m['BWT'])} points**, wall {m['wall_s']:.0f} s"
        + ("" if results["complete"] else f" (incomplete: {len(acc)}/{len(tasks)} stages)"),
        "",
        "Accuracy (%) on each task (columns) after each stage (rows):",
        "",
        "| after \\ on | " + " | ".join(tasks) + " | steps | train s | eval s | adapter KiB | peak RSS MiB |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for stage, row, p in zip(results["stages"], acc, results["per_task"]):
        cells = [pct(row[j]) if j < len(row) else "" for j in range(len(tasks))]
        lines.append(
            f"| {stage} | "
            + " | ".join(cells)
            + f" | {p['steps']} | {p['train_s']:.0f} | {p['eval_s']:.0f} | "
            f"{p['adapter_bytes'] / 1024:.0f} | {p['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_run(run_dir: str | Path, results: dict) -> None:
    """``results.json`` first (the commit point), then ``results.md`` and ``accuracy.png`` beside it."""
    run_dir = Path(run_dir)
    results_file.write(run_dir, results)
    atomic_write_text(run_markdown(results), run_dir / "results.md")
    heatmap(results, run_dir / "accuracy.png")


# -- comparisons -----------------------------------------------------------------------------------


def _pm(xs: list[float | None]) -> str:
    """``"54.2 ± 7.8"`` over seeds, the mean alone for one seed, ``"–"`` for none."""
    m, s = mean_std(xs)
    if math.isnan(m):
        return "–"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len([x for x in xs if x is not None]) > 1 else pct(m)


def _flat(r: dict) -> dict:
    flat = {}
    for k in _SETTINGS:
        v = results_file.base_dtype(r) if k == "dtype" else r.get(k)
        if isinstance(v, dict):
            flat.update({sk: sv for sk, sv in v.items() if sk != "seed"})
        else:
            flat[k] = v
    return flat


def _setting_suffix(r: dict, runs: list[dict]) -> str:
    """`` [lr=0.0005]``: the settings in which this run differs from others being compared, so that
    runs with different settings are never averaged together as seeds."""
    flats = [_flat(x) for x in runs]
    mine = _flat(r)
    diff = [k for k in mine if any(f.get(k) != mine[k] for f in flats)]
    return f" [{', '.join(f'{k}={mine[k]}' for k in diff)}]" if diff else ""


def _learning_accuracy(r: dict) -> float | None:
    """Mean of the diagonal a[j][j] (None for multi-task, which has no per-task stage)."""
    acc = r["accuracy"]
    return statistics.fmean(acc[j][j] for j in range(len(acc))) if len(acc) == len(r["tasks"]) else None


def _group(complete: list[dict]) -> dict[str, list[dict]]:
    """Label → runs (one per seed), seq-lora first, then the methods in ``METHODS`` order."""
    groups: dict[str, list[dict]] = {}
    for r in complete:
        label = method_label(r["method"], r.get("options")) + _setting_suffix(r, complete)
        groups.setdefault(label, []).append(r)
    order = ("seq-lora", *[m for m in METHODS if m != "seq-lora"])
    rank = {m: i for i, m in enumerate(order)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[1][0]["method"], len(rank)), kv[0])))


def _compare_row(label: str, rs: list[dict], T: int) -> str:
    per_task = " / ".join(f"{100 * statistics.fmean(r['accuracy'][-1][j] for r in rs):.0f}" for j in range(T))
    return (
        f"| {label} | {', '.join(str(r['seed']) for r in rs)} | "
        f"{_pm([r['metrics']['AA'] for r in rs])} | {_pm([r['metrics']['BWT'] for r in rs])} | "
        f"{_pm([_learning_accuracy(r) for r in rs])} | {per_task} | "
        f"{statistics.fmean(r['metrics']['wall_s'] for r in rs):.0f} | "
        f"{max(r['per_task'][-1]['adapter_bytes'] for r in rs) / 1024:.0f} | "
        f"{max(r['per_task'][-1]['peak_rss_mb'] for r in rs):.0f} |"
    )


def compare_runs(runs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Group complete runs by method, write ``compare.md`` and ``compare.png`` into ``out``.

    Runs of one method with different seeds are averaged (mean ± sample std over seeds).

    Returns:
        (markdown path, png path).

    Raises:
        ValueError: when no complete run is given, or runs trained different task sequences.
    """
    complete = [r for r in (results_file.read(p) for p in runs) if r["complete"]]
    if not complete:
        raise ValueError("no complete run to compare (a run is complete when every task was evaluated)")
    if len({tuple(r["tasks"]) for r in complete}) > 1:
        raise ValueError(
            "runs trained different task sequences: " + "; ".join({",".join(r["tasks"]) for r in complete})
        )
    groups = _group(complete)
    tasks = complete[0]["tasks"]
    lines = [
        f"# Comparison on {complete[0].get('suite', '?')} ({len(tasks)} tasks: {', '.join(tasks)})",
        "",
        f"model: {complete[0].get('model', '?')}. AA = mean final accuracy (%), BWT = mean change (points) "
        "on earlier tasks between learning them and the end, LA = mean accuracy on each task right after "
        "learning it (plasticity, with the adapter inference uses); mean ± std over seeds.",
        "",
        "| method | seeds | AA | BWT | LA | final accuracy per task | wall s / run | adapter KiB "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_compare_row(label, rs, len(tasks)) for label, rs in groups.items()],
        "",
        "Runs: " + ", ".join(str(Path(r)) for r in runs),
        "",
    ]
    out = Path(out)
    md, png = out / "compare.md", out / "compare.png"
    atomic_write_text("\n".join(lines), md)
    compare_figure(groups, tasks, png)
    return md, png

"""Run reports: ``results.json``, ``results.md``, the accuracy heatmap, and method comparisons.

``results.json`` schema (``"schema": "mbf-continual-results/1"``)::

    schema        "mbf-continual-results/1"
    method        "slao" | "seq-lora" | "ftba-mb" | "slao-inverse" | "slao-random" | ... | "multi-task"
    options       ContinualLoRA options {"init", "schedule", "constant"}; null for multi-task
    seed          int: seeds data order and adapter init (the suite's own seed is in "suite_seed")
    tasks         [str]: task names in training order (T of them)
    lora          LoRAConfig: {"r", "alpha", "dropout", "target_modules", "quantize", "backend"}
    train         TrainOptions: {"lr", "epochs", "max_steps", "batch_size", "eval_batch_size",
                  "max_length", "weight_decay", "warmup_steps", "seed"}
    suite, suite_seed, model, n_train, n_test, data_dir, order   where the tasks and model came from
    stages        [str]: the task trained at each stage ("all" for the multi-task baseline's one stage)
    accuracy      [[float]]: accuracy[i][j] = exact-match accuracy (0..1) on task j's test set after
                  stage i, j = 0..i, computed with the adapter inference uses (SLAO: the merged one).
                  multi-task: one row of T entries
    per_task      [{"task", "steps", "first_loss", "final_loss", "train_s", "eval_s",
                    "adapter_bytes", "peak_rss_mb"}]: one per stage; adapter_bytes = bytes of adapter
                  state held after the stage (SLAO: two adapters per layer, constant in T);
                  peak_rss_mb = the process's peak resident memory so far
    metrics       {"AA": mean_j accuracy[T-1][j],
                   "BWT": mean_{j<T-1} (accuracy[T-1][j] - accuracy[j][j]) (null for multi-task),
                   "wall_s": total train + eval seconds}; AA/BWT null until the run is complete
    complete      bool: every task trained and evaluated
    checkpoint    path (relative to the run dir) of the adapter state after the last finished stage
    versions      {"mbf", "torch", "transformers", "python"}
    started, updated   ISO-8601 UTC times
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

from mbf.io import atomic_write_text
from mbf.tasks import accuracy_metrics

__all__ = ["SCHEMA", "compare_runs", "new_results", "read_results", "write_run"]

SCHEMA = "mbf-continual-results/1"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _versions() -> dict:
    import torch
    import transformers

    import mbf

    return {
        "mbf": mbf.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def new_results(config: dict) -> dict:
    return {
        "schema": SCHEMA,
        **config,
        "stages": [],
        "accuracy": [],
        "per_task": [],
        "metrics": {"AA": None, "BWT": None, "wall_s": 0.0},
        "complete": False,
        "checkpoint": None,
        "versions": _versions(),
        "started": _now(),
        "updated": _now(),
    }


def read_results(path: str | Path) -> dict:
    """Load a results.json (a run directory or the file).

    Raises:
        ValueError: when the file is not an mbf results file of a known schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r} is not {SCHEMA!r}")
    return data


def add_stage(
    results: dict,
    name: str,
    row: list[float],
    stats: dict,
    train_s: float,
    eval_s: float,
    adapter_bytes: int,
    peak_rss_mb: float,
    checkpoint: str | None,
) -> None:
    results["stages"].append(name)
    results["accuracy"].append([round(a, 4) for a in row])
    results["per_task"].append(
        {
            "task": name,
            **stats,
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "adapter_bytes": adapter_bytes,
            "peak_rss_mb": round(peak_rss_mb, 1),
        }
    )
    results["metrics"]["wall_s"] = round(sum(p["train_s"] + p["eval_s"] for p in results["per_task"]), 2)
    results["checkpoint"] = checkpoint
    results["updated"] = _now()


def finish(results: dict, multi_task: bool = False) -> None:
    if multi_task:
        row = results["accuracy"][-1]
        results["metrics"].update({"AA": round(sum(row) / len(row), 4), "BWT": None})
    else:
        m = accuracy_metrics(results["accuracy"])
        results["metrics"].update({k: None if v is None else round(v, 4) for k, v in m.items()})
    results["complete"] = True


# -- one run -------------------------------------------------------------------------------------------


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def run_markdown(results: dict) -> str:
    tasks, acc = results["tasks"], results["accuracy"]
    m = results["metrics"]
    lines = [
        f"# {results['method']} on {results.get('suite', '?')} (seed {results['seed']})",
        "",
        f"model: {results.get('model', '?')}; options: {results.get('options')}; "
        f"LoRA r={results['lora']['r']} alpha={results['lora']['alpha']} on "
        f"{', '.join(results['lora']['target_modules'])}",
        "",
        f"**AA {_fmt(m['AA'])}%, BWT {_fmt(m['BWT'])} points**, wall {m['wall_s']:.0f} s"
        + ("" if results["complete"] else f" (incomplete: {len(acc)}/{len(tasks)} stages)"),
        "",
        "Accuracy (%) on each task (columns) after each stage (rows):",
        "",
        "| after \\ on | " + " | ".join(tasks) + " | steps | train s | eval s | adapter KiB | peak RSS MiB |",
        "|---" * (len(tasks) + 6) + "|",
    ]
    for stage, row, p in zip(results["stages"], acc, results["per_task"]):
        cells = [_fmt(row[j]) if j < len(row) else "" for j in range(len(tasks))]
        lines.append(
            f"| {stage} | "
            + " | ".join(cells)
            + f" | {p['steps']} | {p['train_s']:.0f} | {p['eval_s']:.0f} | "
            f"{p['adapter_bytes'] / 1024:.0f} | {p['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def heatmap(results: dict, path: Path) -> None:
    plt = _plt()
    tasks, acc = results["tasks"], results["accuracy"]
    grid = [[(row[j] if j < len(row) else math.nan) for j in range(len(tasks))] for row in acc]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(tasks), max(2.6, 0.8 + 0.6 * len(grid))))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="center",
                    color="w" if v < 0.6 else "k",
                    fontsize=8,
                )
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(grid)), results["stages"])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    m = results["metrics"]
    ax.set_title(
        f"{results['method']} seed {results['seed']}: AA {_fmt(m['AA'])} BWT {_fmt(m['BWT'])}", fontsize=9
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_run(out: str | Path, results: dict) -> None:
    """results.json (atomically, the commit point), then results.md and accuracy.png beside it."""
    out = Path(out)
    atomic_write_text(json.dumps(results, indent=1), out / "results.json")
    atomic_write_text(run_markdown(results), out / "results.md")
    heatmap(results, out / "accuracy.png")


# -- comparisons -------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pm(xs: list[float | None]) -> str:
    m, s = _mean_std(xs)
    if math.isnan(m):
        return "–"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len([x for x in xs if x is not None]) > 1 else f"{100 * m:.1f}"


_SETTINGS = ("model", "suite_seed", "n_train", "n_test", "train", "lora")


def _flat(r: dict) -> dict:
    flat = {}
    for k in _SETTINGS:
        v = r.get(k)
        if isinstance(v, dict):
            flat.update({f"{sk}": sv for sk, sv in v.items() if sk != "seed"})
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


def _label(r: dict) -> str:
    from mbf.train import METHODS

    label = r["method"]
    if (
        r.get("options")
        and METHODS.get(label)
        and any(r["options"][k] != METHODS[label][k] for k in METHODS[label])
    ):
        label += f" ({r['options']['init']}, {r['options']['schedule']})"  # overridden options
    return label


def compare_runs(runs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Group complete runs by method, write ``compare.md`` and ``compare.png`` into ``out``.

    Runs of one method with different seeds are averaged (mean ± sample std over seeds).

    Returns:
        (markdown path, png path).

    Raises:
        ValueError: when no complete run is given, or runs trained different task sequences.
    """
    loaded = [read_results(r) for r in runs]
    complete = [r for r in loaded if r["complete"]]
    if not complete:
        raise ValueError("no complete run to compare (a run is complete when every task was evaluated)")
    if len({tuple(r["tasks"]) for r in complete}) > 1:
        raise ValueError(
            "runs trained different task sequences: " + "; ".join({",".join(r["tasks"]) for r in complete})
        )
    groups: dict[str, list[dict]] = {}
    for r in complete:
        groups.setdefault(_label(r) + _setting_suffix(r, complete), []).append(r)
    from mbf.train import METHODS

    rank = {m: i for i, m in enumerate(("seq-lora", *[m for m in METHODS if m != "seq-lora"]))}
    groups = dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[1][0]["method"], len(rank)), kv[0])))
    tasks = complete[0]["tasks"]
    T = len(tasks)
    lines = [
        f"# Comparison on {complete[0].get('suite', '?')} ({T} tasks: {', '.join(tasks)})",
        "",
        f"model: {complete[0].get('model', '?')}. AA = mean final accuracy (%), BWT = mean change (points) "
        "on earlier tasks between learning them and the end, LA = mean accuracy on each task right after "
        "learning it (plasticity, with the adapter inference uses); mean ± std over seeds.",
        "",
        "| method | seeds | AA | BWT | LA | final accuracy per task | wall s / run | adapter KiB "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups.items():
        per_task = " / ".join(
            f"{100 * statistics.fmean(r['accuracy'][-1][j] for r in rs):.0f}" for j in range(T)
        )
        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rs)} | "
            f"{_pm([r['metrics']['AA'] for r in rs])} | {_pm([r['metrics']['BWT'] for r in rs])} | "
            f"{_pm([_learning_accuracy(r) for r in rs])} | {per_task} | "
            f"{statistics.fmean(r['metrics']['wall_s'] for r in rs):.0f} | "
            f"{max(r['per_task'][-1]['adapter_bytes'] for r in rs) / 1024:.0f} | "
            f"{max(r['per_task'][-1]['peak_rss_mb'] for r in rs):.0f} |"
        )
    lines += ["", "Runs: " + ", ".join(str(Path(r)) for r in runs), ""]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "compare.md", out / "compare.png"
    atomic_write_text("\n".join(lines), md)
    _compare_plot(groups, tasks, png)
    return md, png


def _compare_plot(groups: dict[str, list[dict]], tasks: list[str], path: Path) -> None:
    plt = _plt()
    labels = list(groups)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # 1: AA and BWT bars with the std over seeds
    x = range(len(labels))
    aa = [_mean_std([r["metrics"]["AA"] for r in groups[k]]) for k in labels]
    bwt = [_mean_std([r["metrics"]["BWT"] for r in groups[k]]) for k in labels]
    w = 0.4
    axes[0].bar(
        [i - w / 2 for i in x],
        [100 * m for m, _ in aa],
        w,
        yerr=[100 * s for _, s in aa],
        label="AA",
        capsize=3,
    )
    axes[0].bar(
        [i + w / 2 for i in x],
        [100 * (0 if math.isnan(m) else m) for m, _ in bwt],
        w,
        yerr=[100 * (0 if math.isnan(s) else s) for _, s in bwt],
        label="BWT",
        capsize=3,
    )
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("%")
    axes[0].set_title("AA and BWT (mean ± std over seeds)")
    axes[0].legend()
    # 2: average accuracy over the tasks seen so far, after each stage
    for k in labels:
        rs = [r for r in groups[k] if len(r["accuracy"]) == len(tasks)]
        if not rs:  # multi-task: one point at the end
            m = statistics.fmean(r["metrics"]["AA"] for r in groups[k])
            axes[1].plot([len(tasks)], [100 * m], "*", ms=12, label=k)
            continue
        curve = [statistics.fmean(statistics.fmean(r["accuracy"][i]) for r in rs) for i in range(len(tasks))]
        axes[1].plot(range(1, len(tasks) + 1), [100 * c for c in curve], "o-", label=k)
    axes[1].set_xticks(range(1, len(tasks) + 1), tasks, rotation=30, ha="right", fontsize=8)
    axes[1].set_xlabel("after training")
    axes[1].set_ylabel("mean accuracy on tasks seen so far (%)")
    axes[1].set_title("Average accuracy along the sequence")
    axes[1].legend(fontsize=7)
    # 3: accuracy on the first task along the sequence (forgetting curve)
    for k in labels:
        rs = [r for r in groups[k] if len(r["accuracy"]) == len(tasks)]
        if rs:
            curve = [statistics.fmean(r["accuracy"][i][0] for r in rs) for i in range(len(tasks))]
            axes[2].plot(range(1, len(tasks) + 1), [100 * c for c in curve], "o-", label=k)
    axes[2].set_xticks(range(1, len(tasks) + 1), tasks, rotation=30, ha="right", fontsize=8)
    axes[2].set_xlabel("after training")
    axes[2].set_ylabel(f"accuracy on task 1 '{tasks[0]}' (%)")
    axes[2].set_title("Forgetting of the first task")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

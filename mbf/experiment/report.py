"""Reports: a run's ``results.md`` and ``accuracy.png``, and ``compare.md`` / ``compare.png`` /
``memory.png`` over runs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from mbf.experiment import results as results_file
from mbf.experiment.methods import METHODS, method_label
from mbf.experiment.metrics import mean_std, pct
from mbf.experiment.paired import METRICS, compare_intervals, to_json
from mbf.experiment.plots import MEMORY, compare_figure, heatmap, memory_figure
from mbf.io import atomic_write_json, atomic_write_text

__all__ = ["compare_runs", "run_markdown", "write_run"]

# settings that make two runs of one method different experiments rather than two seeds of one (not the
# suite seed: by default it follows --seed, each seed drawing its own data sample, a replication too)
_SETTINGS = ("model", "dtype", "n_train", "n_test", "train", "lora", "eval_split")
_HELD_OUT = "scored on held-out training examples (`--eval-split validation`), not the test split"


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
        f"LoRA r={lora['r']} alpha={lora['alpha']} on {', '.join(lora['target_modules'])}"
        + (f"; **{_HELD_OUT}**" if results_file.eval_split(results) == "validation" else ""),
        "",
        f"**AA {pct(m['AA'])}%, BWT {pct(m['BWT'])} points, FWT {pct(m.get('FWT'))} points**, "
        f"wall {m['wall_s']:.0f} s"
        + ("" if results["complete"] else f" (incomplete: {len(acc)}/{len(tasks)} stages)"),
        *[
            f"Resumed after task {c['after_task']} with changed settings (--accept-changes): "
            + "; ".join(c["changes"])
            for c in results.get("resumed_with_changes", [])
        ],
        "",
        "Score (%) on each task (columns) after each stage (rows; the entry right of the diagonal is the "
        "next task before it is trained, for FWT; exact match, or Rouge-L where the task is scored so: "
        f"{_metric_note(results)}):",
        "",
        "| after \\ on | " + " | ".join(tasks) + " | steps | train s | eval s | adapter KiB | optimizer KiB "
        "| replay buffer KiB | peak RSS MiB |",
        "|---" * (len(tasks) + 8) + "|",
    ]
    if results.get("zero_shot"):
        lines.append(
            "| zero-shot (bare model) | " + " | ".join(pct(z) for z in results["zero_shot"]) + " |" + " |" * 7
        )
    for stage, row, p in zip(results["stages"], acc, results["per_task"]):
        cells = [pct(row[j]) if j < len(row) else "" for j in range(len(tasks))]
        lines.append(
            f"| {stage} | "
            + " | ".join(cells)
            + f" | {p['steps']} | {p['train_s']:.0f} | {p['eval_s']:.0f} | "
            + " | ".join(_kib([p], k) for k in MEMORY)
            + f" | {p['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _kib(stages: list[dict], key: str) -> str:
    """The largest ``key`` of ``stages`` (per_task entries) in KiB; ``"–"`` where none has it (older runs
    lack optimizer_bytes, every method but replay buffer_bytes)."""
    values = [p[key] for p in stages if p.get(key) is not None]
    if not values:
        return "–"
    kib = max(values) / 1024
    return f"{kib:.1f}" if 0 < kib < 1 else f"{kib:.0f}"  # a small replay buffer is not 0


def _metric_note(results: dict) -> str:
    metrics = results.get("task_metrics") or ["exact"] * len(results["tasks"])
    rouge = [t for t, m in zip(results["tasks"], metrics) if m == "rougeL"]
    return f"Rouge-L on {', '.join(rouge)}" if rouge else "all exact match"


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
        v = results_file.DEFAULTED[k](r) if k in results_file.DEFAULTED else r.get(k)
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


def _final(r: dict, task: str) -> float:
    """The run's final score on ``task`` (runs of different orders hold their tasks in different columns)."""
    return r["accuracy"][-1][r["tasks"].index(task)]


def _who(r: dict, several_orders: bool) -> str:
    return f"{r.get('order')}:{r['seed']}" if several_orders else str(r["seed"])


def _compare_row(label: str, rs: list[dict], tasks: list[str], several_orders: bool) -> str:
    per_task = " / ".join(f"{100 * statistics.fmean(_final(r, t) for r in rs):.0f}" for t in tasks)
    return (
        f"| {label} | {', '.join(_who(r, several_orders) for r in rs)} | "
        f"{_pm([r['metrics']['AA'] for r in rs])} | {_pm([r['metrics']['BWT'] for r in rs])} | "
        f"{_pm([r['metrics'].get('FWT') for r in rs])} | "
        f"{_pm([_learning_accuracy(r) for r in rs])} | {per_task} | "
        f"{statistics.fmean(r['metrics']['wall_s'] for r in rs):.0f} | "
        + " | ".join(_kib([r["per_task"][-1] for r in rs], k) for k in MEMORY)
        + f" | {max(r['per_task'][-1]['peak_rss_mb'] for r in rs):.0f} |"
    )


def _ci(iv, diff: bool = False) -> str:
    """``"54.2 [50.1, 58.3]"`` in points; a difference signed, with ``n.s.`` when it crosses 0."""
    if iv is None:
        return "–"
    f = "{:+.1f}" if diff else "{:.1f}"
    text = f"{f.format(100 * iv.estimate)} [{f.format(100 * iv.low)}, {f.format(100 * iv.high)}]"
    return text + (" n.s." if diff and not iv.significant else "")


def _interval_lines(iv: dict, tasks: list[str]) -> list[str]:
    """compare.md's paired-interval tables (each method; each minus the baseline)."""
    head = f"| method | units | AA | BWT | FWT | LA | final score per task ({' / '.join(tasks)}) |"
    lines = [
        f"## Paired {100 * iv['level']:.0f}% intervals ({iv['scorer']} scores; bootstrap over test examples "
        f"and over orders × seeds, {iv['n_boot']} replicates; points)",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in iv["methods"].items():
        per_task = " / ".join(_ci(m["tasks"][t]) for t in tasks)
        lines.append(
            f"| {label} | {m['units']} | " + " | ".join(_ci(m[k]) for k in METRICS) + f" | {per_task} |"
        )
    if iv["missing"]:
        lines += ["", f"No saved predictions (runs older than them): {', '.join(iv['missing'])}."]
    if iv["baseline"] is None:
        return lines + [""]
    lines += [
        "",
        f"Difference against **{iv['baseline']}**, paired on the orders, seeds and test examples both ran "
        "(n.s.: not significant, the interval crosses 0):",
        "",
        head.replace("| AA | BWT | FWT | LA | final", "| ΔAA | ΔBWT | ΔFWT | ΔLA | Δ final"),
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in iv["vs_baseline"].items():
        per_task = " / ".join(_ci(m["tasks"][t], diff=True) for t in tasks)
        lines.append(
            f"| {label} | {m['units']} | "
            + " | ".join(_ci(m[k], diff=True) for k in METRICS)
            + f" | {per_task} |"
        )
    return lines + [""]


def _scored_by(path: Path, results: dict, scorer: str | None) -> dict:
    """``results`` as ``scorer`` scored it (its accuracy matrix, zero-shot and metrics); unchanged for None
    or the run's headline (its ``accuracy`` is already that scorer's).

    Raises:
        ValueError: when the run did not record that scorer (naming the run and what it recorded).
    """
    recorded = results_file.scoring(results)
    if scorer is None or scorer == results_file.headline(recorded):  # its accuracy is that scorer's
        return results
    by = results.get("accuracy_by_scorer") or {}
    if scorer not in by:
        raise ValueError(
            f"{path}: scored with --scoring {recorded}, not {scorer} (--scorer needs runs made with "
            f"--scoring {scorer} or both)"
        )
    own = results.get("metrics") or {}
    metrics = {"wall_s": own["wall_s"]} if "wall_s" in own else {}
    metrics.update((own.get("by_scorer") or {}).get(scorer, {}))
    zero = (results.get("zero_shot_by_scorer") or {}).get(scorer, results.get("zero_shot"))
    return {**results, "accuracy": by[scorer], "zero_shot": zero, "metrics": metrics}


def _run_key(results: dict) -> tuple:
    """What tells one run from another: its ``run_id``; an older file's start time with its settings."""
    if results.get("run_id"):
        return ("run_id", results["run_id"])
    settings = ("method", "options", "seed", "order", "tasks", "train", "lora", "started")
    return ("started", *(json.dumps(results.get(k), sort_keys=True) for k in settings))


def _refuse_copies(read: list[tuple[Path, dict]]) -> None:
    """Refuse two results files of one run (a ``cp -r`` copy): they would count as two seeds."""
    seen: dict[tuple, Path] = {}
    for path, r in read:
        key = _run_key(r)
        if key in seen:
            field = f"run_id={r['run_id']}" if key[0] == "run_id" else f"started={r.get('started')}"
            raise ValueError(
                f"{path}: {field}: the same run as {seen[key]} (a copy of it); each run counts once, "
                "never as another seed"
            )
        seen[key] = path


def compare_runs(
    runs: list[str | Path], out: str | Path, *, baseline: str | None = "seq-lora", scorer: str | None = None
) -> tuple[Path, Path]:
    """Group complete runs by method, write ``compare.md``, ``compare.json``, ``compare.png`` and
    ``memory.png`` (each method's memory after each task) into ``out``: mean ± std over runs, and
    paired-bootstrap intervals of each method and of its difference against ``baseline``
    (``mbf.experiment.paired``) where the runs saved predictions.

    ``scorer`` ("generate" or "rank") reads every score (tables, intervals, plots) as that scorer made it,
    from runs made with ``--scoring both`` or that scorer; None: each run's headline.

    Runs of one method with different seeds, or different orders of the same tasks (the paper's
    three orders), are averaged: mean ± sample std over every (order, seed) run of the method.

    Returns:
        (markdown path, png path); ``compare.json`` beside them holds every number, ``memory.png`` the
        memory plot.

    An incomplete run is not averaged with the others; ``compare.md`` names it and how far it got.

    Raises:
        ValueError: when no complete run is given (naming the incomplete ones), or runs trained
            different sets of tasks.
    """
    # a run still in its first task (its lock, no results.json yet: a sweep's glob meets it) is named too
    begun = [Path(p) for p in runs if Path(p, ".mbf-lock").exists() and not Path(p, "results.json").exists()]
    read = [(p, _scored_by(p, results_file.read(p), scorer)) for p in map(Path, runs) if p not in begun]
    _refuse_copies(read)
    complete = [r for _, r in read if r["complete"]]
    paths = [str(p) for p, r in read if r["complete"]]
    # an incomplete run is said, never silently left out: its scores would mix stages with finished runs
    incomplete = [f"{p} ({len(r['per_task'])} of {len(r['tasks'])} tasks trained)" for p, r in read
                  if not r["complete"]] + [f"{p} (no task finished yet)" for p in begun]  # fmt: skip
    if not complete:
        raise ValueError(
            "no complete run to compare (a run is complete when every task was evaluated; "
            f"incomplete: {', '.join(incomplete)}; finish them with mbf continual --resume)"
        )
    if len({frozenset(r["tasks"]) for r in complete}) > 1 or len({r.get("suite") for r in complete}) > 1:
        raise ValueError(
            "runs trained different tasks (orders of one suite's tasks can be compared): "
            + "; ".join(sorted({f"{r.get('suite')}: {','.join(r['tasks'])}" for r in complete}))
        )
    several_orders = len({tuple(r["tasks"]) for r in complete}) > 1
    groups = _group(complete)
    tasks = complete[0]["tasks"]
    where = {id(r): (p if p.is_dir() else p.parent) for p, r in read}
    intervals = compare_intervals(
        {k: [(where[id(r)], r) for r in rs] for k, rs in groups.items()}, baseline, scorer=scorer
    )
    orders = sorted({str(r.get("order")) for r in complete}) if several_orders else []
    who = "orders:seeds" if several_orders else "seeds"
    held_out = all(results_file.eval_split(r) == "validation" for r in complete)
    lines = [
        f"# Comparison on {complete[0].get('suite', '?')} ({len(tasks)} tasks: {', '.join(tasks)})"
        + (f", orders {', '.join(orders)}" if several_orders else ""),
        "",
        f"model: {complete[0].get('model', '?')}. AA = mean final score (%), BWT = mean change (points) "
        "on earlier tasks between learning them and the end, FWT = mean score on each task before training "
        "it minus the bare model's (points), LA = mean score on each task right after learning it "
        "(plasticity); all with the adapter inference uses; mean ± std over "
        + ("every order and seed." if several_orders else "seeds.")
        + (f" All runs {_HELD_OUT}." if held_out else "")
        + (f" Every score here is the {scorer} scorer's (`--scorer {scorer}`)." if scorer else ""),
        "",
        f"| method | {who} | AA | BWT | FWT | LA | final score per task | wall s / run | adapter KiB "
        "| optimizer KiB | replay buffer KiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[_compare_row(label, rs, tasks, several_orders) for label, rs in groups.items()],
        "",
        *_interval_lines(intervals, tasks),
        "Runs: " + ", ".join(paths),
        "",
    ]
    if incomplete:
        lines += [
            f"Not compared, incomplete (finish them with `mbf continual --resume`): {', '.join(incomplete)}",
            "",
        ]
    out = Path(out)
    md, png = out / "compare.md", out / "compare.png"
    atomic_write_text("\n".join(lines), md)
    summary = {
        "runs": paths,
        "incomplete": incomplete,
        "methods": {
            k: {
                "runs": [str(where[id(r)]) for r in rs],
                **{m: [r["metrics"].get(m) for r in rs] for m in ("AA", "BWT", "FWT", "LA")},
                # per run, after each stage: adapter / optimizer / buffer bytes (None: not recorded)
                "memory": {k: [[p.get(k) for p in r["per_task"]] for r in rs] for k in MEMORY},
            }
            for k, rs in groups.items()
        },  # fmt: skip
        "intervals": to_json(intervals),
    }
    atomic_write_json(summary, out / "compare.json")
    compare_figure(groups, tasks, png, by_stage=several_orders, intervals=intervals)
    memory_figure(groups, out / "memory.png")
    return md, png

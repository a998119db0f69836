"""Results files and comparisons of runs, on synthetic results.json files (nothing trained)."""

import json

import pytest

import mbf
from mbf.experiment import results as results_file
from mbf.experiment.methods import method_config
from mbf.experiment.plots import MEMORY, memory_curve
from mbf.experiment.report import compare_runs, run_markdown

LORA = mbf.LoRAConfig(r=4, alpha=8)
META = {"suite": "builtin", "model": "tiny"}


# -- results files and comparisons (synthetic runs) ------------------------------------------------


def _synthetic(
    path,
    *,
    seed=1,
    lr=5e-3,
    rows=((0.9,), (0.5, 0.8), (0.5, 0.6, 0.7)),
    method="slao",
    done=True,
    memory=lambda i: {"adapter_bytes": 4096},
    rank_rows=None,
):
    """A results.json as a run of ``method`` that measured ``rows`` would write (nothing trained)."""
    tasks = ["color", "first", "animal"][: len(rows)]
    config = method_config(method)
    results = results_file.new(
        {
            "method": method,
            "options": config.to_dict() if config else None,
            "seed": seed,
            "tasks": tasks,
            "lora": LORA.to_dict(),
            "train": {"lr": lr, "max_steps": 4, "seed": seed, "scoring": "both" if rank_rows else "generate"},
            **META,
        }
    )
    for i, (task, row) in enumerate(zip(tasks, rows)):
        by_scorer = {"generate": list(row), "rank": list(rank_rows[i])} if rank_rows else None
        stats = {"steps": 4, "first_loss": 3.0, "final_loss": 1.0}
        results_file.add_stage(
            results,
            task=task,
            accuracy=list(row),
            stats=stats,
            train_s=2.0,
            eval_s=1.0,
            peak_rss_mb=100.0,
            **memory(i),
            by_scorer=by_scorer,
            checkpoint=f"checkpoints/task-{i + 1:02d}" if config else None,
        )
    if done:
        results_file.finish(results)
    results_file.write(path, results)
    return path


def test_results_bookkeeping(tmp_path):
    run = _synthetic(tmp_path / "a")
    saved = results_file.read(run)
    assert saved["schema"] == results_file.SCHEMA and saved["complete"]
    assert saved["metrics"] == {"AA": 0.6, "BWT": pytest.approx(-0.3), "FWT": None, "LA": 0.8, "wall_s": 9.0}
    assert {"python", "torch", "mbf"} <= set(saved["versions"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({"schema": "other/2"}))
    older = r"\(nor the older 'mbf-continual-results/1'\)"
    with pytest.raises(ValueError, match=rf"schema 'other/2' is not 'mbf-continual-results/2' {older}"):
        results_file.read(tmp_path / "b")


def test_compare_reads_the_scorer_asked_for(tmp_path):
    gen, rank = ((0.9,), (0.5, 0.8), (0.5, 0.6, 0.7)), ((0.9,), (0.7, 0.8), (0.6, 0.6, 0.9))
    runs = [
        _synthetic(tmp_path / "seq", method="seq-lora", rows=gen, rank_rows=rank),
        _synthetic(tmp_path / "slao", rows=gen, rank_rows=rank),
    ]
    md, _ = compare_runs(runs, tmp_path / "by-rank", scorer="rank")
    text = md.read_text()
    assert "the rank scorer's" in text and "| 70.0 |" in text  # AA by rank: (0.6 + 0.6 + 0.9) / 3
    md, _ = compare_runs(runs, tmp_path / "headline")
    assert "| 60.0 |" in md.read_text() and "rank scorer" not in md.read_text()  # generation: 0.6
    only_generate = _synthetic(tmp_path / "old", rows=gen)
    with pytest.raises(ValueError, match=r"old: scored with --scoring generate, not rank"):
        compare_runs([*runs, only_generate], tmp_path / "mixed", scorer="rank")


def test_compare_averages_seeds_and_rejects_mixed_suites(tmp_path):
    a = _synthetic(tmp_path / "a", seed=1)
    b = _synthetic(tmp_path / "b", seed=2, rows=((0.9,), (0.7, 0.8), (0.7, 0.8, 0.9)))
    md, png = compare_runs([a, b], tmp_path / "cmp")
    text = md.read_text()
    # AA 0.6 and 0.8: 70.0 ± 14.1; BWT -0.3 and -0.1: -20.0 ± 14.1; LA 0.8 and 0.867: 83.3 ± 4.7
    assert (
        "| slao | 1, 2 | 70.0 ± 14.1 | -20.0 ± 14.1 | – | 83.3 ± 4.7 | 60 / 70 / 80 | 9 | 4 | – | – | 100 |"
        in text
    )
    assert png.stat().st_size > 1000
    # a run with other settings is labelled apart, never averaged in as another seed
    lr = _synthetic(tmp_path / "lr", lr=1e-3)
    text = compare_runs([a, b, lr], tmp_path / "cmp3")[0].read_text()
    assert "| slao [lr=0.005] | 1, 2 |" in text and "| slao [lr=0.001] | 1 | 60.0 |" in text
    # seeds that draw their own data sample (the suite seed follows --seed) are seeds of one method
    for run, seed in ((a, 1), (b, 2)):
        saved = results_file.read(run)
        results_file.write(run, {**saved, "suite_seed": seed})
    assert "| slao | 1, 2 | 70.0 ± 14.1 |" in compare_runs([a, b], tmp_path / "cmp5")[0].read_text()
    # a run scored on held-out training examples is another experiment than a test-split run
    held = _synthetic(tmp_path / "held", seed=3)
    results_file.write(held, {**results_file.read(held), "eval_split": "validation"})
    text = compare_runs([a, b, held], tmp_path / "cmp6")[0].read_text()
    assert "| slao [eval_split=test] | 1, 2 |" in text and "| slao [eval_split=validation] | 3 |" in text
    assert "held-out" not in text  # not every run is held-out
    alone = compare_runs([held], tmp_path / "cmp7")[0].read_text()
    assert "All runs scored on held-out training examples" in alone
    assert "scored on held-out training examples" in run_markdown(results_file.read(held))
    assert "held-out" not in run_markdown(results_file.read(a))
    c = _synthetic(tmp_path / "c", rows=((0.9,), (0.5, 0.8)))
    with pytest.raises(ValueError, match="runs trained different tasks"):
        compare_runs([a, c], tmp_path / "cmp2")


def test_compare_names_the_incomplete_runs_it_leaves_out(tmp_path):
    """An incomplete run is not averaged with finished ones, and compare.md says so (never silently)."""
    a = _synthetic(tmp_path / "a", seed=1)
    b = _synthetic(tmp_path / "b", seed=2, rows=((0.9,), (0.7, 0.8), (0.7, 0.8, 0.9)))
    cut = _synthetic(tmp_path / "cut", seed=3, done=False)
    saved = results_file.read(cut)  # stopped after task 2 of 3
    for key in ("stages", "accuracy", "per_task"):
        saved[key] = saved[key][:2]
    saved["checkpoint"] = "checkpoints/task-02"
    results_file.write(cut, saved)
    begun = tmp_path / "begun"  # a run in its first task: its lock, no results.json yet
    begun.mkdir()
    (begun / ".mbf-lock").write_text("123")
    text = compare_runs([a, b, cut, begun], tmp_path / "cmp4")[0].read_text()
    assert "| slao | 1, 2 |" in text
    assert f"Runs: {a}, {b}" in text
    note = "Not compared, incomplete (finish them with `mbf continual --resume`)"
    assert f"{note}: {cut} (2 of 3 tasks trained), {begun} (no task finished yet)" in text
    with pytest.raises(ValueError, match=rf"no complete run to compare .*incomplete: {cut} \(2 of 3 tasks"):
        compare_runs([cut], tmp_path / "cmp5")


def test_compare_averages_over_orders_of_the_same_tasks(tmp_path):
    """The paper's three orders: runs of one method over different orders are one group; each task's
    final score is read from its own column."""
    a = _synthetic(tmp_path / "a", rows=((0.9,), (0.5, 0.8), (0.5, 0.6, 0.7)))  # color, first, animal
    b = _synthetic(tmp_path / "b", rows=((0.9,), (0.5, 0.8), (0.1, 0.2, 0.3)))
    saved = results_file.read(b)
    saved["tasks"], saved["order"] = ["animal", "first", "color"], "o2"
    saved["stages"] = saved["tasks"]  # each stage trains the order's task (results.read checks it)
    results_file.write(b, saved)
    text = compare_runs([a, b], tmp_path / "cmp")[0].read_text()
    assert "orders None, o2" in text.splitlines()[0]
    # color 0.5 and 0.3, first 0.6 and 0.2, animal 0.7 and 0.1 -> 40 / 40 / 40
    assert "| slao | None:1, o2:1 | 40.0 ± 28.3 |" in text and "| 40 / 40 / 40 |" in text


def test_compare_orders_seq_lora_first_and_labels_overrides(tmp_path):
    slao = _synthetic(tmp_path / "slao")
    seq = _synthetic(tmp_path / "seq", method="seq-lora")
    inv = _synthetic(tmp_path / "inv")
    saved = results_file.read(inv)
    saved["options"]["schedule"] = "inverse"
    results_file.write(inv, saved)
    text = compare_runs([slao, inv, seq], tmp_path / "cmp")[0].read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| s")]
    assert rows == ["| seq-lora", "| slao", "| slao (orthogonal, inverse)"]


def test_memory_after_each_task_in_the_reports_and_the_memory_plot(tmp_path):
    """SLAO flat, a per-task method growing with T: results.md and compare.md list adapter, optimizer and
    replay-buffer bytes after each task, memory.png plots them against the number of tasks."""

    def flat(i):
        return {"adapter_bytes": 8192, "optimizer_bytes": 4096}

    def growing(i):
        return {"adapter_bytes": 2048 * (i + 2), "optimizer_bytes": 4096, "buffer_bytes": 1024 * (i + 1)}

    slao = _synthetic(tmp_path / "slao", memory=flat)
    replay = _synthetic(tmp_path / "replay", method="seq-lora", memory=growing)
    old = _synthetic(tmp_path / "old", seed=2)  # an older run: adapter bytes only
    md = run_markdown(results_file.read(replay))
    assert "| adapter KiB | optimizer KiB | replay buffer KiB | peak RSS MiB |" in md
    assert "| 4 | 2 | 1 | 4 | 4 | 1 | 100 |" in md and "| 4 | 2 | 1 | 8 | 4 | 3 | 100 |" in md
    assert "| 8 | 4 | – | 100 |" in run_markdown(results_file.read(slao))
    text = compare_runs([slao, replay, old], tmp_path / "cmp")[0].read_text()
    assert "| 9 | 8 | 4 | – | 100 |" in text  # slao: the old run's optimizer bytes are unknown, not 0
    assert "| 9 | 8 | 4 | 3 | 100 |" in text
    assert (tmp_path / "cmp" / "memory.png").stat().st_size > 1000
    memory = json.loads((tmp_path / "cmp" / "compare.json").read_text())["methods"]["seq-lora"]["memory"]
    assert memory["adapter_bytes"] == [[4096, 6144, 8192]] and memory["buffer_bytes"] == [[1024, 2048, 3072]]
    runs = [results_file.read(replay)]
    assert memory_curve(runs, MEMORY[:1]) == [4096, 6144, 8192]
    assert memory_curve(runs, MEMORY) == [4096 + 4096 + 1024, 6144 + 4096 + 2048, 8192 + 4096 + 3072]


def test_two_writers_of_one_figure_never_share_a_temporary_file(tmp_path, monkeypatch):
    """A second process drawing the heatmap while the first is mid-write (issue 12: a fixed temporary
    name made one crash): each writes its own temporary file, and only the figure is left."""
    from mbf.experiment import plots

    results = results_file.read(_synthetic(tmp_path / "run"))
    path, real, temporaries = tmp_path / "fig" / "accuracy.png", plots.atomic_write, []
    path.parent.mkdir()

    def interleaved(target, write):
        def first_writes_after_the_second(tmp):
            temporaries.append(tmp)
            if len(temporaries) == 1:
                plots.heatmap(results, target)  # the other writer, start to finish
            write(tmp)

        return real(target, first_writes_after_the_second)

    monkeypatch.setattr(plots, "atomic_write", interleaved)
    plots.heatmap(results, path)
    assert len(set(temporaries)) == 2 and all(t.parent == path.parent for t in temporaries)
    assert [p.name for p in path.parent.iterdir()] == ["accuracy.png"] and path.stat().st_size > 1000


def test_the_plot_labels_say_how_many_units_each_interval_is_over():
    # a one-unit ablation beside a nine-unit method: the bars look alike, the labels must not
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbf.experiment import plots
    from mbf.experiment.stats import Interval

    iv = Interval(0.02, 0.01, 0.03, 0.95)
    row = {"AA": iv, "BWT": iv, "FWT": None}
    nine, one = {**row, "units": 9}, {**row, "units": 1}
    diffs = {"slao": nine, "slao-random": one}
    intervals = {"baseline": "seq-lora", "methods": {"slao": nine}, "vs_baseline": diffs}
    fig, (a, b) = plt.subplots(1, 2)
    plots._differences(a, intervals)
    plots._bars(b, {"slao": [], "multi-task": [{"metrics": {"AA": 0.6}}]}, intervals)
    assert [t.get_text() for t in a.get_xticklabels()] == ["slao (9 units)", "slao-random (1 unit)"]
    assert [t.get_text() for t in b.get_xticklabels()] == ["slao (9 units)", "multi-task"]
    plt.close(fig)
    # the curves average over every run of a method: their legend says how many
    fig, ax = plt.subplots()
    run = {"accuracy": [[0.5, 0.1], [0.4, 0.6]], "metrics": {"AA": 0.5}}
    plots._curves(ax, {"slao": [run, run], "multi-task": [{"accuracy": [], "metrics": {"AA": 0.7}}]},
                  ["a", "b"], plots._seen_mean, "y", "t")  # fmt: skip
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["slao (2 runs)", "multi-task (1 run)"]
    plt.close(fig)

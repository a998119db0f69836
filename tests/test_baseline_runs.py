"""Task arithmetic, TIES and replay as whole runs (``run_continual`` and ``mbf continual``) on the tiny Llama:
resume equals an uninterrupted run, the memory results.json records against a hand count, the
checkpoints and the registry."""

from contextlib import redirect_stdout
from io import StringIO

import pytest
from fixtures.tiny import char_codec, save_tiny_checkpoint, tiny_llama

import mbf
from mbf.cli import main
from mbf.experiment import results as results_file
from mbf.experiment.methods import METHODS, method_label
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.train import TrainOptions
from mbf.strategies import load_strategy
from mbf.strategies.replay import ExperienceReplay, ReplayConfig, draw_buffer
from mbf.strategies.task_merge import TaskMergeConfig, TaskMergeLoRA

R = 4
LORA = mbf.LoRAConfig(r=R, alpha=8)  # q_proj 64 -> 64 and v_proj 64 -> 32 in each of 2 layers
OPTS = TrainOptions(lr=5e-3, max_steps=3, batch_size=4, eval_batch_size=6, seed=2)


def _tasks(n_train=12):
    return conflict_suite(0, n_train=n_train, n_test=4, n_tasks=3)


def _run(out, method, tasks=None, **kw):
    log = kw.pop("log", lambda s: None)
    return run_continual(tiny_llama(), char_codec(), tasks or _tasks(), out, method=method, lora=LORA,
                         opts=OPTS, meta={"suite": "builtin"}, log=log, **kw)  # fmt: skip


def _interrupted_then_resumed(out, method, tasks=None):
    def interrupt_after_task_2(line: str) -> None:
        if "task 2/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(out, method, tasks, log=interrupt_after_task_2)
    return _run(out, method, tasks, resume=True)


# the hand count: an adapter is r (in + out) fp32 per adapted linear; AdamW keeps two fp32 moments of it
ADAPTER = sum(R * (i + o) * 4 for i, o in [(64, 64), (64, 32)] * 2)
DENSE = sum(i * o * 4 for i, o in [(64, 64), (64, 32)] * 2)  # the merged ΔW of the full variant


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "replay"])
def test_resume_equals_uninterrupted_run_and_memory_is_the_hand_count(tmp_path, method):
    tasks = _tasks(n_train=60 if method == "replay" else 12)  # replay: 2% of 60 -> 1 example kept per task
    full = _run(tmp_path / "full", method, tasks)
    assert full["complete"] and full["method"] == method
    resumed = _interrupted_then_resumed(tmp_path / "cut", method, tasks)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["per_task"] == [
        {**p, "train_s": q["train_s"], "eval_s": q["eval_s"], "peak_rss_mb": q["peak_rss_mb"]}
        for p, q in zip(full["per_task"], resumed["per_task"])
    ]  # the losses and every memory figure too
    per_task = full["per_task"]
    assert [p["steps"] for p in per_task] == [3, 3, 3]  # replayed examples add no steps
    assert all(p["optimizer_bytes"] == 2 * ADAPTER for p in per_task)  # 2 moments x every trained element
    if method == "replay":  # sequential LoRA's two adapters, flat; the buffer grows by one example per task
        assert all(p["adapter_bytes"] == 2 * ADAPTER for p in per_task)
        kept = [tasks[t].train[draw_buffer(60, t, ReplayConfig(seed=OPTS.seed))[0]] for t in range(3)]
        sizes = [len(ex.input.encode()) + len(ex.output.encode()) for ex in kept]
        assert [p["buffer_bytes"] for p in per_task] == [sum(sizes[: t + 1]) for t in range(3)]
        assert full["options"] == {"fraction": 0.02, "seed": OPTS.seed}  # the run's seed
    else:  # the shared start, the current LoRA, one kept LoRA per task, and the merged ΔW
        assert [p["adapter_bytes"] for p in per_task] == [(2 + t) * ADAPTER + DENSE for t in (1, 2, 3)]
        assert "buffer_bytes" not in per_task[0]
        assert len(full["finetuned_diagonal"]) == 3  # the task's own LoRA, evaluated beside the merge


def test_a_merge_run_checkpoint_rebuilds_the_merge(tmp_path):
    _run(tmp_path / "run", "ties")
    res = results_file.read(tmp_path / "run")
    model = tiny_llama()
    cl = load_strategy(model, tmp_path / "run" / res["checkpoint"])  # injects the saved LoRAConfig
    assert isinstance(cl, TaskMergeLoRA) and cl.task_index == 3 and len(cl.kept) == 3
    assert cl.config == TaskMergeConfig(merge="ties") and cl.deltas is not None
    with pytest.raises(ValueError, match="saved by the 'task-merge' strategy, not 'replay'"):
        ExperienceReplay.load(tiny_llama(), tmp_path / "run" / res["checkpoint"])


def test_registry_and_labels():
    assert METHODS["task-arithmetic"] == TaskMergeConfig(merge="task_arithmetic", lam=0.4)
    assert METHODS["ties"] == TaskMergeConfig(merge="ties", lam=1.0, density=0.2)
    assert METHODS["replay"] == ReplayConfig(fraction=0.02)
    assert method_label("replay", {"fraction": 0.02, "seed": 7}) == "replay"  # a seed is a replication
    assert method_label("ties", {"merge": "ties", "lam": 0.5, "density": 0.2}) == "ties (lam=0.5)"


def test_cli_runs_ties_low_rank_and_replay(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    common = ["--model", str(model), "--suite", "conflict", "--n-train", "8", "--n-test", "4", "--max-steps",
              "2", "--batch-size", "4", "--r", "2", "--alpha", "4", "--eval-batch-size", "4"]  # fmt: skip
    for method, extra in (("ties", ["--option", "low_rank=true"]), ("replay", ["--option", "fraction=0.25"])):
        printed = StringIO()
        with redirect_stdout(printed):
            assert (
                main(["continual", "--method", method, *extra, "--out", str(tmp_path / method), *common]) == 0
            )
        assert f"{method}: AA" in printed.getvalue()
        res = results_file.read(tmp_path / method)
        assert res["complete"]
        with redirect_stdout(StringIO()):  # the saved state evaluates as the run did
            assert main(["eval", "--run", str(tmp_path / method), "--eval-batch-size", "4"]) == 0
    assert results_file.read(tmp_path / "ties")["options"]["low_rank"] is True
    assert results_file.read(tmp_path / "replay")["per_task"][0]["buffer_bytes"] > 0
    printed = StringIO()
    with redirect_stdout(printed):
        assert (
            main(["compare", str(tmp_path / "ties"), str(tmp_path / "replay"), "--out", str(tmp_path / "c")])
            == 0
        )
    assert (tmp_path / "c" / "memory.png").stat().st_size > 1000
    assert "| optimizer KiB | replay buffer KiB |" in printed.getvalue()

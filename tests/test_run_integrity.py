"""Issue 20, the application: a run's files are checked, its changes applied, its commands fail in one line.

The red team's cases on ``mbf continual`` / ``eval`` / ``compare``: an accepted change on resume is
applied, an edited or inconsistent results.json is refused, a checkpoint outside the run is refused, the
model fingerprint covers every weight, eval uses the run's dtype and suite, compare counts a run once.
"""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fixtures.tiny import char_codec, save_tiny_checkpoint, tiny_llama

import mbf
from mbf.checkpoint import read_checkpoint
from mbf.cli import main
from mbf.experiment import results as results_file
from mbf.experiment.methods import method_config
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.train import TrainOptions
from mbf.experiment.zero_shot import weights_fingerprint
from mbf.strategies.slao import ContinualConfig

LORA = mbf.LoRAConfig(r=4, alpha=8)
OPTS = TrainOptions(lr=5e-3, max_steps=3, batch_size=4, eval_batch_size=6, seed=1)
META = {"suite": "conflict", "model": "tiny"}


def _run(out, method="slao", config="preset", log=lambda s: None, **kw):
    tasks = conflict_suite(0, n_train=12, n_test=6, n_tasks=3)
    return run_continual(tiny_llama(), char_codec(), tasks, out, method=method, config=config, lora=LORA,
                         opts=OPTS, meta=META, log=log, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(a complete SLAO run, the same run killed after task 1)``: tests copy them to change them."""
    root = tmp_path_factory.mktemp("runs")

    def stop_after_task_1(line: str) -> None:
        if "task 1/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(root / "cut", log=stop_after_task_1)
    _run(root / "full")
    return root / "full", root / "cut"


def _copy(src, tmp_path):
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run"


def _edit(run, change, keep_checksum=False) -> None:
    data = json.loads((run / "results.json").read_text())
    change(data)
    if not keep_checksum:  # recomputed, as an editor who knows the field would (dropped: test_read_back.py)
        data["sha256"] = results_file.checksum(data)
    (run / "results.json").write_text(json.dumps(data))


# -- resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, overrides, field, want",
    [("slao", {"schedule": "inverse"}, "schedule", "inverse"), ("seq-lora", {}, "init", "none")],
)
def test_an_accepted_change_on_resume_is_applied(runs, tmp_path, method, overrides, field, want):
    run = _copy(runs[1], tmp_path)
    config = method_config(method, **overrides)
    results = _run(run, method=method, config=config, resume=True, accept_changes=True)
    assert results["complete"] and results["resumed_with_changes"]
    saved = read_checkpoint(run / results["checkpoint"], config_class=ContinualConfig).config
    assert isinstance(saved, ContinualConfig) and getattr(saved, field) == want


def test_an_edited_results_file_is_refused(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    _edit(run, lambda d: d["accuracy"][0].__setitem__(0, 1.0), keep_checksum=True)
    with pytest.raises(ValueError, match=r"results.json: its SHA-256 differs from its content"):
        results_file.read(run)
    with pytest.raises(ValueError, match=r"its SHA-256 differs"):
        _run(run, resume=True)


def _drop_last_stage(d: dict) -> None:
    for key in ("stages", "accuracy", "per_task", "finetuned_diagonal"):
        d[key].pop()
    for matrix in d["accuracy_by_scorer"].values():
        matrix.pop()
    d["complete"] = False


def test_a_removed_stage_is_caught(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    _edit(run, _drop_last_stage)  # checkpoint still names task-03
    with pytest.raises(ValueError, match=r"checkpoint='checkpoints/task-03' is not the last stage's "):
        results_file.read(run)
    (run / "checkpoints" / "task-03").rename(run / "checkpoints" / "task-02")
    _edit(run, lambda d: d.__setitem__("checkpoint", "checkpoints/task-02"))
    with pytest.raises(ValueError, match=r"task-02 holds 3 finished tasks, results.json records 2"):
        _run(run, resume=True)


def test_a_checkpoint_outside_the_run_is_refused(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    _edit(run, lambda d: d.__setitem__("checkpoint", "../other/checkpoints/task-03"))
    with pytest.raises(ValueError, match=r"checkpoint='../other/checkpoints/task-03' is not the last stage"):
        results_file.read(run)
    assert main(["eval", "--run", str(run)]) == 2


def test_resume_without_the_checkpoints_says_they_are_missing(runs, tmp_path):
    run = _copy(runs[1], tmp_path)  # cut after task 1: what a copy of its results alone would leave
    shutil.rmtree(run / "checkpoints")
    before = (run / "results.json").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"records 1 finished tasks, but .*task-01 is missing"):
        _run(run, resume=True)
    assert (run / "results.json").read_bytes() == before


def test_resume_of_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: .*nothing.* no run to resume"):
        _run(tmp_path / "nothing", resume=True)


def test_the_model_fingerprint_covers_every_weight():
    model = tiny_llama()
    before = weights_fingerprint(model)
    with torch.no_grad():
        p = model.model.layers[0].mlp.up_proj.weight
        p.view(-1)[p.numel() // 2] += 1.0  # neither among the first nor the last 64 values
    assert weights_fingerprint(model) != before


def test_the_conflict_suite_refuses_more_examples_than_it_has():
    with pytest.raises(ValueError, match=r"n_train=400000 \+ n_test=100 .* 342,144 distinct inputs"):
        conflict_suite(0, n_train=400_000, n_test=100)


# -- the command ------------------------------------------------------------------------------------------

SMALL = ["--suite", "conflict", "--n-train", "8", "--n-test", "4", "--max-steps", "1", "--batch-size", "4",
         "--r", "2", "--alpha", "4", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    model = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["continual", "--out", str(run), "--model", str(model), "--dtype", "float32", *SMALL]) == 0
    return run, model


def test_eval_of_a_run_uses_its_dtype_and_suite(cli_run, tmp_path, capsys):
    run = _copy(cli_run[0], tmp_path)
    saved = results_file.read(run)
    results_file.write(run, {**saved, "dtype": "float16"})  # as if it had trained in float16
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    assert "(float16, --dtype auto: the run's)" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--suite", "domains"]) == 2
    assert "--suite domains: the run was trained on the conflict suite" in capsys.readouterr().err


def test_compare_counts_a_run_once(cli_run, capsys):
    run = str(cli_run[0])
    assert main(["compare", run, run, os.path.join(run, "results.json")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_the_lock_is_held_while_the_model_loads(cli_run, tmp_path, monkeypatch):
    from mbf.cli import commands

    out, load = tmp_path / "locked", commands._load
    seen = {}

    def load_and_probe(*args, **kwargs):
        probe = "import fcntl as f, os, sys; f.flock(os.open(sys.argv[1], os.O_RDWR), f.LOCK_EX | f.LOCK_NB)"
        seen["rc"] = subprocess.run([sys.executable, "-c", probe, str(out / ".mbf-lock")]).returncode
        return load(*args, **kwargs)

    monkeypatch.setattr(commands, "_load", load_and_probe)
    assert main(["continual", "--out", str(out), "--model", str(cli_run[1]), *SMALL]) == 0
    assert seen["rc"] != 0  # another process could not take the lock while this one loaded its model
    fd = os.open(out / ".mbf-lock", os.O_RDWR)  # released afterwards
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_disk_or_a_read_only_file_system_is_one_line(cli_run, tmp_path, monkeypatch, capsys, code):
    from mbf.experiment import report

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "results.json"))

    monkeypatch.setattr(report, "write_run", fail)
    assert main(["continual", "--out", str(tmp_path / "out"), "--model", str(cli_run[1]), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mbf: error: [Errno") and os.strerror(code) in err[-1]


def _as_an_older_run(run) -> None:
    """``run`` as the version before issue 39 wrote it: results schema /1 without run_id, a checkpoint
    without the run's identity."""
    _edit(run, lambda d: (d.pop("run_id"), d.__setitem__("schema", results_file.LEGACY_SCHEMA)))
    ckpt = run / results_file.read(run)["checkpoint"]
    mbf.ContinualLoRA.load(tiny_llama(), ckpt).save(ckpt)  # saved outside a run: no "run" field


def test_a_run_that_recorded_the_older_fingerprint_still_resumes(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    _as_an_older_run(run)  # a run that recorded the older fingerprint is an older run
    _edit(run, lambda d: d.__setitem__("model_fingerprint", weights_fingerprint(tiny_llama(), legacy=True)))
    assert _run(run, resume=True)["complete"]
    _edit(run, lambda d: d.__setitem__("model_fingerprint", weights_fingerprint(tiny_llama(1), legacy=True)))
    with pytest.raises(ValueError, match=r"model_fingerprint: \w{12} -> \w{12}"):
        _run(run, resume=True)


# -- O-LoRA / SAPT folders ----------------------------------------------------------------------------------


def _benchmark(tmp_path):
    from pathlib import Path

    root = tmp_path / "CL_Benchmark"
    shutil.copytree(Path(__file__).parent / "fixtures" / "cl_benchmark", root)
    return root


def test_a_label_missing_from_labels_json_is_named(tmp_path):
    from mbf.experiment.suites.olora import load_benchmark

    root = _benchmark(tmp_path)
    labels = root / "SC" / "amazon" / "labels.json"
    labels.write_text(json.dumps(["negative", "neutral", "positive"]))
    with pytest.raises(ValueError, match=r"amazon/train.json: record 0: label 'very positive' is not in"):
        load_benchmark(root, ["amazon"])


def test_two_folders_for_one_task_or_a_task_given_twice_are_refused(tmp_path):
    from mbf.experiment.suites.olora import load_benchmark
    from mbf.experiment.tasks import check_tasks

    root = _benchmark(tmp_path)
    with pytest.raises(ValueError, match=r"task 'dbpedia' is given twice"):
        check_tasks(load_benchmark(root, ["dbpedia", "amazon", "dbpedia"]))
    shutil.copytree(root / "TC" / "dbpedia", root / "Long_Sequence" / "dbpedia")
    with pytest.raises(ValueError, match=r"2 folders for task 'dbpedia': .*Long_Sequence/dbpedia, .*TC/db"):
        load_benchmark(root, ["dbpedia"])

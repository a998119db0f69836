"""reports/run_job.sh: a cut run resumes below its log; a complete one is skipped; a new one starts afresh."""

import json
import os
import subprocess
from pathlib import Path

_SCRIPT = Path(__file__).parents[1] / "reports" / "run_job.sh"


def _fake_mbf(tmp_path: Path) -> Path:
    """An `mbf` that prints its arguments and counts its calls (the runner's only dependency on mbf)."""
    fake = tmp_path / "fake-mbf"
    fake.write_text(f'#!/usr/bin/env bash\necho "args: $*"\necho call >> {tmp_path}/calls\n')
    fake.chmod(0o755)
    return fake


def _run(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MBF": str(_fake_mbf(tmp_path))}
    return subprocess.run(["bash", str(_SCRIPT), str(tmp_path / "out"), name, "--seed", "1"],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip


def _cut(tmp_path: Path, name: str, complete: bool) -> Path:
    run = tmp_path / "out" / "run" / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"complete": complete}))
    log = tmp_path / "out" / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True)
    log.write_text("the cut run's training\n")
    return log


def test_a_cut_run_is_resumed_below_its_own_log(tmp_path):
    log = _cut(tmp_path, "a", complete=False)
    out = _run(tmp_path, "a")
    text = log.read_text()
    assert text.startswith("the cut run's training\n")
    assert "resumed" in text
    assert text.rstrip().endswith("--resume")
    assert "start a (resumed)" in out.stdout


def test_a_complete_run_is_not_run_again(tmp_path):
    log = _cut(tmp_path, "b", complete=True)
    _run(tmp_path, "b")
    assert not (tmp_path / "calls").exists()
    assert log.read_text() == "the cut run's training\n"


def test_a_new_run_starts_its_log_empty(tmp_path):
    log = tmp_path / "out" / "logs" / "c.log"
    log.parent.mkdir(parents=True)
    log.write_text("a log of a run since deleted\n")
    _run(tmp_path, "c")
    text = log.read_text()
    assert "deleted" not in text and "--resume" not in text
    assert text.startswith("args: continual --seed 1 --out ")

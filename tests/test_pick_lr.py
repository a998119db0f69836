"""reports/pick_lr.py: each method's learning rate from a held-out sweep (synthetic runs, nothing trained)."""

import importlib.util
from pathlib import Path

import pytest

from mbf.experiment import results as results_file

_SCRIPT = Path(__file__).parents[1] / "reports" / "pick_lr.py"
_spec = importlib.util.spec_from_file_location("pick_lr", _SCRIPT)
pick_lr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pick_lr)


def _run(root, method, lr, final, *, done=True, split="validation", steps=4):
    """A results.json of ``method`` at ``lr`` whose AA is ``final`` (two tasks, both ending at it)."""
    res = results_file.new({
        "method": method, "seed": 0, "tasks": ["a", "b"], "lora": {"r": 8}, "suite": "real",
        "train": {"lr": lr, "max_steps": steps}, "n_train": 8, "n_test": 4, "data_fingerprint": "sha256:x",
        **({"eval_split": split} if split != "test" else {}),
    })  # fmt: skip
    rows = [[final]] if not done else [[final], [final, final]]
    for task, row in zip(["a", "b"], rows):
        results_file.add_stage(res, task=task, accuracy=row, stats={"steps": steps}, train_s=1.0, eval_s=1.0,
                               adapter_bytes=1, peak_rss_mb=1.0, checkpoint=None)  # fmt: skip
    if done:
        results_file.finish(res)
    results_file.write(root / "run" / f"{method}-lr{lr:g}", res)


def test_the_best_rate_per_method_and_a_tie_keeps_the_smaller(tmp_path):
    for lr, aa in ((3e-4, 0.40), (1e-3, 0.55), (3e-3, 0.50)):
        _run(tmp_path, "seq-lora", lr, aa)
    for lr, aa in ((3e-4, 0.61), (1e-3, 0.61), (3e-3, 0.20)):
        _run(tmp_path, "slao", lr, aa)
    assert pick_lr.main(tmp_path) == 0
    assert (tmp_path / "chosen.txt").read_text() == "seq-lora 0.001\nslao 0.0003\n"
    text = (tmp_path / "choice.md").read_text()
    assert "| seq-lora | 40.0 | **55.0** | 50.0 |" in text
    assert "At the grid's edge (a rate beyond it was not tried, and might score higher): slao (0.0003)" in (
        text
    )


def test_a_cut_sweep_chooses_nothing_and_removes_an_old_choice(tmp_path):
    for lr in (3e-4, 1e-3):
        _run(tmp_path, "seq-lora", lr, 0.5)
    _run(tmp_path, "seq-lora", 3e-3, 0.9, done=False)  # would win if a cut run counted
    (tmp_path / "chosen.txt").write_text("seq-lora 0.003\n")  # from an earlier sweep
    (tmp_path / "run" / "slao-lr0.001").mkdir()  # in its first task: no results.json yet
    assert pick_lr.main(tmp_path) == 1
    assert not (tmp_path / "chosen.txt").exists()
    text = (tmp_path / "choice.md").read_text()
    assert "seq-lora-lr0.003" in text and "slao-lr0.001 (no task finished yet)" in text
    assert "No rate chosen" in text
    # a method missing a rate of the grid (its job never ran) is not settled either
    _run(tmp_path, "seq-lora", 3e-3, 0.9)
    (tmp_path / "run" / "slao-lr0.001").rmdir()
    _run(tmp_path, "slao", 1e-3, 0.6)
    assert pick_lr.main(tmp_path) == 1 and not (tmp_path / "chosen.txt").exists()
    assert "| slao | – | 60.0 | – |" in (tmp_path / "choice.md").read_text()


def test_test_split_runs_and_mixed_settings_are_refused(tmp_path):
    _run(tmp_path, "seq-lora", 1e-3, 0.5, split="test")
    with pytest.raises(SystemExit, match="scored on the test split"):
        pick_lr.main(tmp_path)
    _run(tmp_path, "seq-lora", 1e-3, 0.5)
    _run(tmp_path, "slao", 1e-3, 0.5, steps=8)
    with pytest.raises(SystemExit, match="differ in more than the method and learning rate"):
        pick_lr.main(tmp_path)

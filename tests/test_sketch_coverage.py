"""reports/sketch_coverage.py: the share of past input energy a sketch-merge checkpoint's sketch holds."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mbf.checkpoint import Checkpoint, write_checkpoint

_SCRIPT = Path(__file__).parents[1] / "reports" / "sketch_coverage.py"
_spec = importlib.util.spec_from_file_location("sketch_coverage", _SCRIPT)
sketch_coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sketch_coverage)


def _checkpoint(run: Path, task: str, tensors: dict, strategy: str = "sketch-merge") -> None:
    """A checkpoint as a run saves it (mbf.checkpoint's format), named by the run's results.json."""
    ckpt = Checkpoint(int(task[-2:]), False, None, None, tensors, strategy)
    write_checkpoint(run / "checkpoints" / task, ckpt)
    (run / "results.json").write_text(json.dumps({"checkpoint": f"checkpoints/{task}"}))


def test_share_is_kept_energy_over_total_from_the_checkpoint_results_json_names(tmp_path, capsys):
    run = tmp_path / "long1-sketch-merge-s0"
    _checkpoint(run, "task-01", {"l0.energy": torch.tensor([1.0]), "l0.total": torch.tensor([1.0])})
    _checkpoint(run, "task-02", {
        "l0.energy": torch.tensor([3.0, 1.0]), "l0.total": torch.tensor([8.0]),  # 50 %
        "l1.energy": torch.tensor([9.0, 0.0]), "l1.total": torch.tensor([10.0]),  # 90 %
        "l1.lora_A": torch.zeros(2, 3),
    })  # fmt: skip
    task, k, share = sketch_coverage.coverage(run)
    assert (task, k) == ("task-02", 2)
    assert share == pytest.approx({"l0": 0.5, "l1": 0.9})
    assert sketch_coverage.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "after task-02, k 2, 2 distinct inputs" in out
    assert "50.0 / 70.0 / 90.0 %" in out and "lowest l0" in out


def test_a_run_without_a_sketch_or_checkpoint_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"checkpoint": "checkpoints/task-01"}))
    with pytest.raises(SystemExit, match="no checkpoint"):
        sketch_coverage.coverage(tmp_path)
    _checkpoint(tmp_path, "task-01", {"l0.lora_A": torch.zeros(2, 3)})
    with pytest.raises(SystemExit, match="no sketch"):
        sketch_coverage.coverage(tmp_path)
    _checkpoint(tmp_path / "other", "task-01", {"l0.lora_A": torch.zeros(2, 3)}, strategy="inflora")
    with pytest.raises(ValueError, match="saved by the 'inflora' strategy, not 'sketch-merge'"):
        sketch_coverage.coverage(tmp_path / "other")
    tensors = next((tmp_path / "checkpoints" / "task-01").glob("adapters-*.safetensors"))
    data = tensors.read_bytes()
    tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a flipped bit: refused, not read
    with pytest.raises(ValueError, match="SHA-256 differs"):
        sketch_coverage.coverage(tmp_path)

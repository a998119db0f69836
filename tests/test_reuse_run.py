"""reports/reuse_run.py: a finished run of another sweep is copied only when every asked field matches."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

_ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("reuse_run", _ROOT / "reports" / "reuse_run.py")
reuse_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reuse_run)

# a committed run of the paired re-run (seq-lora, std1, seed 0, lr 1e-3, both scorers, test split)
_RUN = _ROOT / "reports" / "paired" / "run" / "std1-seq-lora-s0"
_SAME = ["method=seq-lora", "seed=0", "order=std1", "train.lr=1e-3", "train.scoring=both", "n_test=200",
         "train.offdiag_test=50", "eval_split=test"]  # fmt: skip


@pytest.fixture
def src(tmp_path):
    shutil.copytree(_RUN, tmp_path / "src")
    return tmp_path / "src"


def test_copied_when_every_field_matches(src, tmp_path, capsys):
    assert reuse_run.main([str(src), str(tmp_path / "out" / "run" / "x"), *_SAME]) == 0
    copied = tmp_path / "out" / "run" / "x"
    assert (copied / "results.json").read_bytes() == (src / "results.json").read_bytes()
    assert sorted(p.name for p in (copied / "predictions").iterdir()) == sorted(
        p.name for p in (src / "predictions").iterdir()
    )
    assert "reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "why"),
    [
        ("train.lr=3e-3", "train.lr: has 0.001, asked 0.003"),
        ("eval_split=validation", "eval_split: has 'test', asked 'validation'"),
        ("method=slao", "method: has 'seq-lora', asked 'slao'"),
        ("train.no_such=1", "train.no_such: missing, asked 1"),
    ],
)
def test_not_copied_when_a_field_differs(src, tmp_path, capsys, field, why):
    assert reuse_run.main([str(src), str(tmp_path / "dst"), *_SAME, field]) == 0
    assert not (tmp_path / "dst").exists()
    assert why in capsys.readouterr().out


def test_a_cut_run_or_an_existing_destination_is_left_alone(src, tmp_path, capsys):
    res = json.loads((src / "results.json").read_text())
    (tmp_path / "dst").mkdir()
    assert reuse_run.main([str(src), str(tmp_path / "dst"), *_SAME]) == 0
    assert list((tmp_path / "dst").iterdir()) == []  # the sweep's own (cut) run stays
    assert reuse_run.mismatches({**res, "complete": False}, {}) == ["complete: the run is cut"]


def test_an_edited_source_is_refused(src, tmp_path):
    res = json.loads((src / "results.json").read_text())
    res["seed"] = 1  # its checksum no longer matches
    (src / "results.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="SHA-256"):
        reuse_run.main([str(src), str(tmp_path / "dst"), *_SAME])


def test_bad_arguments():
    assert reuse_run.main(["only-one"]) == 2
    assert reuse_run.main(["a", "b", "no-equals-sign"]) == 2

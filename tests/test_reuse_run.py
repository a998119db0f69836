"""reports/reuse_run.py: a finished run of another sweep is copied only when every asked field matches."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from mbf.experiment import results as results_file

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
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*"))  # noqa: E731
    assert files(copied) == files(src) and "predictions.json.gz" in files(src)  # its predictions packed
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


def _ref(src, tmp_path, **changes):
    """A reference run: SRC's results with ``changes`` (dotted keys), written with a valid checksum."""
    res = results_file.read(src)
    for key, value in changes.items():
        *outer, last = key.split(".")
        node = res
        for part in outer:
            node = node[part]
        node[last] = value
    ref = tmp_path / "ref"
    ref.mkdir()
    results_file.write(ref, res)
    return ref


# what a sweep's own learning-rate run legitimately differs in from a reused run of the test split
_ASKED = ["method=seq-lora", "seed=0", "train.seed=0", "order=std1", "train.lr=1e-3", "n_test=200",
          "train.offdiag_test=50", "train.scoring=both", "eval_split=test"]  # fmt: skip


def test_like_copies_when_every_other_setting_is_the_reference_runs(src, tmp_path, capsys):
    ref = _ref(src, tmp_path, n_test=100, **{"train.scoring": "generate", "eval_split": "validation"})
    assert reuse_run.main(["--like", str(ref), str(src), str(tmp_path / "dst"), *_ASKED]) == 0
    assert (tmp_path / "dst" / "results.json").is_file()
    assert f"settings as {ref}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"train.batch_size": 16}, "train.batch_size: has 8, asked 16"),  # a shared flag that changed
        ({"lora.alpha": 32}, "lora.alpha: has 16.0, asked 32"),  # a default that changed
        ({"lora.target_modules": ["q_proj"]}, "lora.target_modules: has"),
        ({"train.warmup_steps": 0}, "train.warmup_steps: has 3, asked 0"),
        ({"dtype": "bfloat16"}, "dtype: has 'float32', asked 'bfloat16'"),
        ({"model_fingerprint": "sha256:00"}, "model_fingerprint: has"),
        ({"train.new_option": 1}, "train.new_option: missing, asked 1"),
    ],
)
def test_like_refuses_a_setting_the_sweep_no_longer_has(src, tmp_path, capsys, change, why):
    ref = _ref(src, tmp_path, **change)
    assert reuse_run.main(["--like", str(ref), str(src), str(tmp_path / "dst"), *_ASKED]) == 0
    assert not (tmp_path / "dst").exists()
    assert why in capsys.readouterr().out


def test_like_without_a_complete_reference_reuses_nothing(src, tmp_path, capsys):
    assert reuse_run.main(["--like", str(tmp_path / "none"), str(src), str(tmp_path / "dst"), *_ASKED]) == 0
    ref = _ref(src, tmp_path, complete=False)
    assert reuse_run.main(["--like", str(ref), str(src), str(tmp_path / "dst"), *_ASKED]) == 0
    assert not (tmp_path / "dst").exists()
    out = capsys.readouterr().out
    assert "no run at" in out and "is cut" in out

"""The ``mbf`` command against bad input, a second writer and a user's directory: one line on stderr,
exit status 2, nothing written or deleted.

Most commands here name a ``--model`` that does not exist: a check that ran after the model loaded would
say "not a Hugging Face checkpoint" instead, so each test also shows its check comes first.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from fixtures.tiny import char_codec, save_tiny_checkpoint, tiny_llama
from safetensors import SafetensorError

from mbf.cli import main
from mbf.cli.commands import COMMANDS
from mbf.experiment import rundir
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite

FIXTURE = Path(__file__).parent / "fixtures" / "cl_benchmark"


def _continual(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """``mbf continual`` on a copy of the O-LoRA fixture (``tmp_path/data``), with no model to load."""
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(FIXTURE, data)
    return ["continual", "--out", str(out), "--model", str(tmp_path / "no-model"), "--suite", "olora",
            "--data-dir", str(data), "--order", "dbpedia,amazon", "--n-train", "4", "--n-test", "2",
            *extra]  # fmt: skip


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mbf: error: ") and err.count("\n") == 1, err  # one line
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


def test_the_control_reaches_the_model(tmp_path, capsys):
    """With good data and a fresh --out the command gets as far as loading the (missing) model."""
    assert main(_continual(tmp_path, tmp_path / "run")) == 2
    assert "not a Hugging Face checkpoint" in _error(capsys)


# -- a second writer, a user's directory --------------------------------------------------------------


def test_a_second_process_on_one_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.lock(out):  # as a running `mbf continual` holds it (test_rundir: from another process)
        assert main(_continual(tmp_path, out)) == 2
        assert f"{out} is being written by another mbf process (pid {os.getpid()})" in _error(capsys)
        with pytest.raises(rundir.RunLocked, match=rf"pid {os.getpid()}"):  # the API takes the lock too
            run_continual(tiny_llama(), char_codec(), conflict_suite(0, 4, 2, n_tasks=2), out)
    assert sorted(os.listdir(out)) == [".mbf-lock"]  # nothing written by either


def test_an_out_holding_files_but_no_run_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints" / "task-final").mkdir(parents=True)
    (out / "checkpoints" / "task-final" / "adapter.safetensors").write_bytes(b"the user's weights")
    (out / "results.md").write_text("the user's notes")
    before = _files(out)
    for resume in ([], ["--resume"]):  # --resume does not make it a run
        assert main(_continual(tmp_path, out, *resume)) == 2
        assert f"--out {out} is not empty and holds no mbf run (checkpoints, results.md)" in _error(capsys)
    with pytest.raises(FileExistsError, match="holds no mbf run"):  # the API refuses it too
        run_continual(tiny_llama(), char_codec(), conflict_suite(0, 4, 2, n_tasks=2), out)
    assert _files(out) == before  # not even a lock file


def test_an_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_continual(tmp_path, tmp_path / "file" / "run")) == 2
    assert "Not a directory" in _error(capsys)


# -- bad data: named, before the model ----------------------------------------------------------------


def _write(relative: str, content: bytes | str):
    def apply(data: Path) -> None:
        path = data / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return apply


def _jsonl(data: Path) -> None:
    (data / "TC/dbpedia/train.json").unlink()
    (data / "TC/dbpedia/train.jsonl").write_text('{"sentence": "a", "label": "Plant"}\n{"sentence": \n')


@pytest.mark.parametrize(
    "damage, message",
    [
        (_write("TC/dbpedia/train.json", "[{"), r"TC/dbpedia/train.json: not valid JSON at line 1 column 3"),
        (_write("TC/dbpedia/train.json", b"\xff[]"), r"TC/dbpedia/train.json: not UTF-8 text \(byte 0"),
        (_write("TC/dbpedia/train.json", '["just text"]'), r"train.json: record 0 is a str, not an object"),
        (
            _write("TC/dbpedia/train.json", '[{"text": "x"}]'),
            r"train.json: record 0 needs input/sentence and output/label fields, has \['text'\]",
        ),
        (_write("TC/dbpedia/train.json", '{"Instances": 3}'), r"train.json: expected a list of records"),
        (_write("TC/dbpedia/test.json", "[]"), r"task 'dbpedia' \(\S+/TC/dbpedia\) has no test examples"),
        (_write("SC/amazon/train.json", "[]"), r"task 'amazon' \(\S+/SC/amazon\) has no training examples"),
        (_write("TC/dbpedia/labels.json", '{"a": 1}'), r"labels.json: expected a list of label strings"),
        (_jsonl, r"TC/dbpedia/train.jsonl: not valid JSON at line 2"),
    ],
)
def test_bad_data_is_named_before_the_model_loads(tmp_path, capsys, damage, message):
    argv = _continual(tmp_path, tmp_path / "run")
    damage(tmp_path / "data")
    assert main(argv) == 2
    err = _error(capsys)
    assert re.search(message, err), err
    assert main(["eval", *argv[3:]]) == 2  # mbf eval reads the suite first too (no --out)
    assert re.search(message, _error(capsys))


def test_a_damaged_results_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    damaged = ((b"\xff\xfe{", "not UTF-8 text (byte 0"), (b'{"schema": ', "not valid JSON at line 1"),
               (b"[1, 2]", "expected a JSON object, got list"))  # fmt: skip
    for content, message in damaged:
        (run / "results.json").write_bytes(content)
        for argv in (["eval", "--run", str(run)], ["compare", str(run)]):
            assert main(argv) == 2
            assert f"{run / 'results.json'}: {message}" in _error(capsys)


def test_a_damaged_model_file_is_named(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes((10**12).to_bytes(8, "little") + weights.read_bytes()[8:])  # header length
    capsys.readouterr()  # the save's progress bar
    argv = ["continual", "--out", str(tmp_path / "run"), "--model", str(model), "--suite", "conflict",
            "--n-train", "4", "--n-test", "2"]  # fmt: skip
    assert main(argv) == 2
    assert f"--model {model}: its weights cannot be read (Error while deserializing header" in _error(capsys)


# -- the funnel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        FloatingPointError("train 1/5 color: loss is nan at step 3; lower --lr"),
        OverflowError("cannot convert float infinity to integer"),
        NotADirectoryError(20, "Not a directory", "runs/x/y"),
        IsADirectoryError(21, "Is a directory", "runs/x"),
        PermissionError(13, "Permission denied", "runs/x"),
        SafetensorError("Error while deserializing header:\nheader too large"),
        json.JSONDecodeError("Expecting value", "{", 1),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        rundir.RunLocked("runs/x is being written by another mbf process (pid 7)"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_expected_failures_are_one_line_and_exit_2(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setitem(COMMANDS, "compare", fail)
    assert main(["compare", "runs/x"]) == 2
    err = _error(capsys)
    assert ("OverflowError: " in err) == isinstance(error, OverflowError)  # Python's words need the type
    monkeypatch.setenv("MBF_DEBUG", "1")  # the traceback on request
    with pytest.raises(type(error)):
        main(["compare", "runs/x"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setitem(COMMANDS, "compare", bug)
    with pytest.raises(AttributeError):
        main(["compare", "runs/x"])

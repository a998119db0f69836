"""Issue 39: nothing a run reads back is trusted unchecked.

Each file a run writes is checked against what wrote it when it is read again: results.json (its checksum
cannot be dropped, its scores are range-checked), the checkpoints (the run's identity bound in, the
strategy state covered by a checksum), the predictions (checksum, identity, and their scores against
results.json's), the zero-shot cache. A mismatch is one line naming the file and the field.
"""

import gzip
import json
import re
import shutil
from dataclasses import replace

import pytest
from fixtures.tiny import char_codec, save_tiny_checkpoint, tiny_llama

import mbf
from mbf.cli import main
from mbf.experiment import predictions, rundir, zero_shot
from mbf.experiment import results as results_file
from mbf.experiment.methods import method_config
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.train import TrainOptions

LORA = mbf.LoRAConfig(r=4, alpha=8)
OPTS = TrainOptions(lr=5e-3, max_steps=3, batch_size=4, eval_batch_size=6, seed=1)
META = {"suite": "conflict", "model": "tiny"}


def _tasks():
    return conflict_suite(0, n_train=12, n_test=6, n_tasks=3)  # color, first, animal


def _run(out, method="slao", config="preset", tasks=None, opts=OPTS, log=lambda s: None, **kw):
    return run_continual(tiny_llama(), char_codec(), tasks or _tasks(), out, method=method, config=config,
                         lora=LORA, opts=opts, meta=META, log=log, **kw)  # fmt: skip


def _stop_after_task_1(line: str) -> None:
    if "task 1/3" in line:
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(a complete SLAO run, the same run killed after task 1)``: tests copy them to change them."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.raises(KeyboardInterrupt):
        _run(root / "cut", log=_stop_after_task_1)
    _run(root / "full")
    return root / "full", root / "cut"


def _copy(src, tmp_path, name="run"):
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def _json(path, change=None):
    """``path``'s JSON, changed in place by ``change`` (written back) when given."""
    data = json.loads(path.read_text())
    if change is not None:
        change(data)
        path.write_text(json.dumps(data))
    return data


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- B1: the order (and the kind of method) is the run's identity -------------------------------------------


def test_a_resume_with_another_order_is_refused_even_with_accept_changes(runs, tmp_path):
    """It used to train ``[color, animal, color]``, never ``first``, and say complete."""
    run = _copy(runs[1], tmp_path)
    before = _files(run)
    color, first, animal = _tasks()
    for accept in (False, True):
        with pytest.raises(ValueError, match=r"results.json: tasks: \['color', 'first', 'animal'\] -> "
                           r"\['color', 'animal', 'first'\].*even with --accept-changes"):  # fmt: skip
            _run(run, tasks=[color, animal, first], resume=True, accept_changes=accept)
    assert _files(run) == before


def test_check_resume_refuses_another_order_name_or_a_switch_to_or_from_multi_task(tmp_path):
    slao = {"method": "slao", "options": method_config("slao").to_dict(), "seed": 0, "tasks": ["a", "b", "c"],
            "suite": "olora", "order": "O1"}  # fmt: skip
    results_file.write(tmp_path, results_file.new(slao))
    other = {**slao, "order": "O2", "tasks": ["b", "c", "a"]}
    changed = r"results.json: tasks: \['a', 'b', 'c'\] -> \['b', 'c', 'a'\]; order: 'O1' -> 'O2': .*identity"
    with pytest.raises(ValueError, match=changed):
        rundir.check_resume(tmp_path, other, accept_changes=True)
    multi = {**slao, "method": "multi-task", "options": None}
    with pytest.raises(ValueError, match=r"results.json: method: 'slao' -> 'multi-task'"):
        rundir.check_resume(tmp_path, multi, accept_changes=True)
    results_file.write(tmp_path, results_file.new(multi))  # the reverse used to raise a TypeError
    with pytest.raises(ValueError, match=r"results.json: method: 'multi-task' -> 'slao'"):
        rundir.check_resume(tmp_path, slao, accept_changes=True)
    assert rundir.check_resume(tmp_path, {**slao, "method": "multi-task", "options": None}) is not None


def test_a_resume_of_a_slao_run_as_multi_task_is_refused(runs, tmp_path):
    """It used to exit 0 with "AA –%"."""
    run = _copy(runs[1], tmp_path)
    with pytest.raises(ValueError, match=r"method: 'slao' -> 'multi-task'"):
        _run(run, method="multi-task", config=None, resume=True, accept_changes=True)


# -- B2: results.json's checksum cannot be dropped; its scores are range-checked ---------------------------


def test_a_results_file_without_its_checksum_is_refused(runs, tmp_path):
    """It used to be accepted, re-signed by the resume, and its edited scores reported (BWT -1.875)."""
    run = _copy(runs[1], tmp_path)
    _json(run / "results.json", lambda d: (d.pop("sha256"), d["accuracy"][0].__setitem__(0, 7.5)))
    before = _files(run)
    with pytest.raises(ValueError, match=r"results.json: sha256=None: every mbf-continual-results/2 file"):
        results_file.read(run)
    with pytest.raises(ValueError, match=r"results.json: sha256=None"):
        _run(run, resume=True)
    assert _files(run) == before
    _json(run / "results.json", lambda d: (d.pop("run_id"), d.update(sha256=results_file.checksum(d))))
    with pytest.raises(ValueError, match=r"results.json: run_id=None"):  # nor can the identity
        results_file.read(run)


@pytest.mark.parametrize("field, value, message", [
    ("accuracy", 7.5, r"accuracy\[0\]\[0\]=7.5 is not a score in \[0, 1\]"),
    ("accuracy", -3.0, r"accuracy\[0\]\[0\]=-3.0 is not a score in \[0, 1\]"),
    ("accuracy", "0.5", r"accuracy\[0\]\[0\]='0.5' is not a score"),
    ("zero_shot", 1.5, r"zero_shot\[0\]=1.5 is not a score"),
    ("metrics", 2.0, r"metrics.BWT=2.0 is out of range \[-1, 1\]"),
])  # fmt: skip
def test_scores_out_of_range_are_refused_even_with_a_valid_checksum(runs, tmp_path, field, value, message):
    run = _copy(runs[0], tmp_path)
    saved = results_file.read(run)
    if field == "accuracy":
        saved["accuracy"][0][0] = value
    elif field == "zero_shot":
        saved["zero_shot"][0] = value
    else:
        saved["metrics"]["BWT"] = value
    results_file.write(run, saved)  # a valid checksum over the out-of-range value
    with pytest.raises(ValueError, match=rf"results.json: {message}"):
        results_file.read(run)
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2


def test_an_older_results_file_is_read_and_range_checked_and_resumed_only_with_its_checksum(runs, tmp_path):
    """A /1 file (before run_id) still reads, its scores checked; one without a checksum (written before
    checksums existed, or with it dropped) is never resumed: it cannot be checked."""
    run = _copy(runs[1], tmp_path)
    older = {k: v for k, v in _json(run / "results.json").items() if k != "run_id"}
    older["schema"] = results_file.LEGACY_SCHEMA
    (run / "results.json").write_text(json.dumps({**older, "sha256": results_file.checksum(older)}))
    assert results_file.read(run)["schema"] == results_file.LEGACY_SCHEMA
    older.pop("sha256")
    (run / "results.json").write_text(json.dumps(older))
    assert results_file.read(run)["schema"] == results_file.LEGACY_SCHEMA  # compare, eval read it
    before = _files(run)
    with pytest.raises(ValueError, match=r"results.json: sha256 is missing: .* cannot be checked, so it is"):
        _run(run, resume=True)
    assert _files(run) == before
    _json(run / "results.json", lambda d: d["accuracy"][0].__setitem__(0, -3.0))
    with pytest.raises(ValueError, match=r"accuracy\[0\]\[0\]=-3.0 is not a score"):
        results_file.read(run)


def test_a_results_file_holding_only_its_schema_is_named(tmp_path, capsys):
    """``compare`` used to raise ``KeyError: 'complete'``."""
    for schema in (results_file.SCHEMA, results_file.LEGACY_SCHEMA):
        run = tmp_path / schema.replace("/", "-")
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"schema": schema}))
        assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"mbf: error: {run / 'results.json'}: ")
    assert "sha256=None" in err or "method is missing" in err


# -- B3: a checkpoint is bound to its run; its strategy state is covered by a checksum -----------------------


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """``(another seed's run cut after task 1, a replay run cut after task 1)``."""
    root = tmp_path_factory.mktemp("others")
    with pytest.raises(KeyboardInterrupt):
        _run(root / "seed2", opts=replace(OPTS, seed=2), log=_stop_after_task_1)
    with pytest.raises(KeyboardInterrupt):
        _run(root / "replay", method="replay", log=_stop_after_task_1)
    return root / "seed2", root / "replay"


def test_another_runs_checkpoint_copied_in_is_refused(runs, others, tmp_path, capsys):
    """It used to continue silently with the other seed's tensors while results.json named seed 1."""
    run = _copy(runs[1], tmp_path)
    shutil.rmtree(run / "checkpoints" / "task-01")
    shutil.copytree(others[0] / "checkpoints" / "task-01", run / "checkpoints" / "task-01")
    before = _files(run)
    with pytest.raises(ValueError, match=r"task-01/continual.json: run.run_id=.*run.seed=2 \(results.json: "
                       r"1\).*saved by another run"):  # fmt: skip
        _run(run, resume=True)
    assert _files(run) == before
    assert main(["eval", "--run", str(run)]) == 2  # eval --run scores the run's own adapter only
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the note that the run is incomplete
    assert err.startswith("mbf: error: ") and "task-01/continual.json: run.run_id=" in err


def test_a_checkpoint_saved_outside_the_run_is_refused(runs, tmp_path):
    """A library save (no run identity) in the run's place: refused, naming the field."""
    run = _copy(runs[1], tmp_path)
    ckpt = run / "checkpoints" / "task-01"
    mbf.ContinualLoRA.load(tiny_llama(), ckpt).save(ckpt)
    with pytest.raises(ValueError, match=r"task-01/continual.json: run=None: not saved by this run"):
        _run(run, resume=True)


@pytest.mark.parametrize("which, change, field", [
    ("replay", lambda m: m["strategy_state"].__setitem__("kept", [[0]]), "strategy_state"),
    ("slao", lambda m: m["config"].__setitem__("schedule", "inverse"), "config"),
    ("slao", lambda m: m.__setitem__("run", None), "run"),
    ("slao", lambda m: m.pop("run"), "run"),
])  # fmt: skip
def test_an_edited_checkpoint_field_is_refused(runs, others, tmp_path, which, change, field):
    """Other valid values in continual.json (replay's ``kept``, SLAO's schedule, the run dropped) used to
    be trained on silently."""
    run = _copy(others[1] if which == "replay" else runs[1], tmp_path)
    meta = run / "checkpoints" / "task-01" / "continual.json"
    _json(meta, change)
    method = {"method": "replay"} if which == "replay" else {}
    with pytest.raises(ValueError, match=rf"task-01/continual.json: (run=None|{field}: not what was saved)"):
        _run(run, resume=True, **method)
    if field != "run":  # the library's own loader refuses it too
        from mbf.strategies import load_strategy

        with pytest.raises(ValueError, match=rf"continual.json: {field}: not what was saved with adapters-"):
            load_strategy(tiny_llama(), meta.parent)


def test_a_checkpoint_saved_inside_a_task_is_one_line(runs, tmp_path, capsys):
    """It used to end in a RuntimeError traceback at the next begin_task."""
    run = _copy(runs[1], tmp_path)
    _json(run / "checkpoints" / "task-01" / "continual.json", lambda m: m.__setitem__("in_task", True))
    with pytest.raises(ValueError, match=r"task-01/continual.json: in_task=true: saved inside a task"):
        _run(run, resume=True)


# -- B4: predictions carry a checksum and the identity, and agree with results.json ------------------------


def _edit_predictions(run, stage, change, sign=False):
    path = run / "predictions" / f"stage-{stage:02d}.json"

    def edit(data):
        change(data)
        if sign:  # as an editor who recomputes the checksum would
            data["sha256"] = predictions._checksum(data)

    _json(path, edit)


def _all_correct(data):
    for e in data["evals"]:
        e["correct"] = [1.0] * len(e["correct"])


def _all_correct_and_scores(data):
    _all_correct(data)
    for e in data["evals"]:
        e["score"] = 1.0


@pytest.mark.parametrize("change, sign, message", [
    (_all_correct, False, r"stage-03.json: its SHA-256 differs from its content"),
    (lambda d: d.pop("sha256"), False, r"stage-03.json: sha256=None: every mbf-predictions/2 file carries"),
    (_all_correct, True, r"stage-03.json: evals\[0\].score=0.\d+ \(color, generate\) is not the mean of its "
                         r"correct \(1\)"),
    (_all_correct_and_scores, True, r"stage-03.json: evals\[0\].score=1.0000 \(color, generate, merged\) but "
                                    r"results.json's accuracy\[2\]\[0\]=0"),
    (lambda d: d["run"].__setitem__("seed", 2), True, r"stage-03.json: run.seed=2 \(results.json: 1\)"),
    (lambda d: d.__setitem__("run", None), True, r"stage-03.json: run=None: not this run's predictions"),
    (lambda d: d["evals"][0]["correct"].__setitem__(0, 7.5), True, r"evals\[0\].correct\[0\]=7.5 is not a"),
])  # fmt: skip
def test_edited_predictions_are_refused_by_compare(runs, tmp_path, capsys, change, sign, message):
    """Every ``correct`` set to 1.0 in stage-03.json used to give "AA 100.0 [100, 100]", significant."""
    run = _copy(runs[0], tmp_path)
    _edit_predictions(run, 3, change, sign)
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mbf: error: ")
    assert re.search(message, err), err


def test_predictions_of_an_older_run_are_checked_against_its_scores(runs, tmp_path, capsys):
    """A run of results schema /1 (predictions /1, no checksum): its predictions still have to agree with
    its results.json, so an edited file is caught; a missing one leaves the intervals out, as before."""
    run = _copy(runs[0], tmp_path)
    older = {k: v for k, v in _json(run / "results.json").items() if k not in ("run_id", "sha256")}
    (run / "results.json").write_text(json.dumps({**older, "schema": results_file.LEGACY_SCHEMA}))
    for path in (run / "predictions").iterdir():
        _json(path, lambda d: (d.pop("sha256"), d.pop("run"), d.update(schema=predictions.LEGACY_SCHEMA)))
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    _edit_predictions(run, 3, _all_correct_and_scores)
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    want = "stage-03.json: evals[0].score=1.0000 (color, generate, merged) but results.json's accuracy[2][0]="
    assert want in capsys.readouterr().err


def test_a_missing_predictions_file_of_a_current_run_is_named(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path)
    (run / "predictions" / "stage-02.json").unlink()
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    assert "stage-02.json: missing, but results.json records 3 stages" in capsys.readouterr().err


# -- B4 packed: one predictions.json.gz per finished run (issue 40: the checkout's weight) ------------------


def _ranked_tasks():
    """The tasks with their answers as options: ``--scoring both`` (records with ``option_scores``)."""
    return [replace(t, labels=sorted({e.output for e in t.train + t.test})) for t in _tasks()]


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    """A complete SLAO run scored by both scorers (rank records carry ``option_scores``)."""
    out = tmp_path_factory.mktemp("both") / "run"
    _run(out, tasks=_ranked_tasks(), opts=replace(OPTS, scoring="both"))
    return out


def _stages(run):
    return {s: predictions.read(run, s) for s in range(4)}


def _edit_pack(run, change, sign=False):
    """The run's pack decompressed, changed by ``change`` and written back (re-signed with ``sign``)."""
    path = run / predictions.PACK
    data = json.loads(gzip.decompress(path.read_bytes()))
    change(data)
    if sign:  # as an editor who recomputes the checksum would
        data["sha256"] = predictions._checksum(data)
    path.write_bytes(gzip.compress(json.dumps(data).encode()))


def test_a_packed_run_reads_as_its_files_less_option_scores(both_run, tmp_path):
    run = _copy(both_run, tmp_path)
    raw, scorer = _stages(run), "rank"
    loaded = {sc: predictions.load_run(run, results_file.read(run), sc) for sc in ("generate", scorer)}
    assert any("option_scores" in e for e in raw[3]["evals"])
    path = predictions.pack(run, remove=True)
    assert path == run / "predictions.json.gz" and not (run / "predictions").exists()
    for s, data in _stages(run).items():
        want = {k: v for k, v in raw[s].items() if k != "sha256"}
        want["evals"] = [{k: v for k, v in e.items() if k != "option_scores"} for e in raw[s]["evals"]]
        assert data == want
    assert {sc: predictions.load_run(run, results_file.read(run), sc) for sc in loaded} == loaded
    # idempotent: packing again (from the pack, or from the files again) gives the same bytes
    blob = path.read_bytes()
    assert predictions.pack(run) == path and path.read_bytes() == blob
    again = _copy(both_run, tmp_path, "again")
    assert predictions.pack(again).read_bytes() == blob and (again / "predictions").is_dir()
    assert _stages(again) == raw  # while the files are there they are read, whole


def test_compare_on_a_packed_run_equals_compare_on_its_files(both_run, tmp_path):
    run = _copy(both_run, tmp_path)

    def compare(name, *extra):
        assert main(["compare", str(run), "--out", str(tmp_path / name), *extra]) == 0
        return {f: (tmp_path / name / f).read_bytes() for f in ("compare.md", "compare.json")}

    raw = compare("raw"), compare("raw-rank", "--scorer", "rank")  # --scorer rank used to be refused
    predictions.pack(run, remove=True)
    assert (compare("raw"), compare("raw-rank", "--scorer", "rank")) == raw
    assert b"Paired 95% intervals" in raw[0]["compare.md"]


def test_a_pack_only_of_a_complete_run(runs, tmp_path):
    with pytest.raises(ValueError, match=r"cut: the run is not complete"):
        predictions.pack(_copy(runs[1], tmp_path, "cut"))
    run = _copy(runs[0], tmp_path)
    _edit_predictions(run, 3, _all_correct_and_scores, sign=True)  # a file compare refuses is not packed
    with pytest.raises(ValueError, match=r"stage-03.json: evals\[0\].score=1.0000 .* but results.json's"):
        predictions.pack(run)
    assert not (run / predictions.PACK).exists()


def _pack_all_correct(data):
    _all_correct(data["stages"][3])


def _pack_all_correct_and_scores(data):
    _all_correct_and_scores(data["stages"][3])


_GZ = r"predictions.json.gz"


@pytest.mark.parametrize("change, sign, message", [
    (_pack_all_correct, False, rf"{_GZ}: its SHA-256 differs from its content"),
    (lambda d: d.pop("sha256"), False, rf"{_GZ}: sha256=None: every mbf-predictions-pack/1 file carries one"),
    (_pack_all_correct, True, rf"{_GZ}:stage-03.json: evals\[0\].score=0.\d+ \(color, generate\) is not the "
                              r"mean of its correct \(1\)"),
    (_pack_all_correct_and_scores, True, rf"{_GZ}:stage-03.json: evals\[0\].score=1.0000 \(color, generate, "
                                         r"merged\) but results.json's accuracy\[2\]\[0\]=0"),
    (lambda d: d["stages"][3]["run"].__setitem__("seed", 2), True,
     rf"{_GZ}:stage-03.json: run.seed=2 \(results.json: 1\)"),
    (lambda d: d["stages"][3].__setitem__("run", None), True, r"stage-03.json: run=None: not this run's"),
    (lambda d: d["stages"].pop(2), True, rf"stage-02.json: missing \(nor in {_GZ}\), but results.json"),
    (lambda d: d["stages"][1].__setitem__("stage", 2), True, rf"{_GZ}: stages\[2\].stage=2 is not a"),
])  # fmt: skip
def test_an_edited_pack_is_refused_by_compare_as_a_file(runs, tmp_path, capsys, change, sign, message):
    run = _copy(runs[0], tmp_path)
    predictions.pack(run, remove=True)
    _edit_pack(run, change, sign)
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mbf: error: ")
    assert re.search(message, err), err


def test_a_damaged_pack_and_an_older_runs_pack_are_checked(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path)
    predictions.pack(run, remove=True)
    (run / predictions.PACK).write_bytes((run / predictions.PACK).read_bytes()[:-30])
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    assert "predictions.json.gz: not gzip-compressed JSON" in capsys.readouterr().err
    # a run of results schema /1 (predictions /1, the committed sweeps'): packed, its scores still checked
    older = _copy(runs[0], tmp_path, "older")
    legacy = {k: v for k, v in _json(older / "results.json").items() if k not in ("run_id", "sha256")}
    (older / "results.json").write_text(json.dumps({**legacy, "schema": results_file.LEGACY_SCHEMA}))
    for path in (older / "predictions").iterdir():
        _json(path, lambda d: (d.pop("sha256"), d.pop("run"), d.update(schema=predictions.LEGACY_SCHEMA)))
    predictions.pack(older, remove=True)
    assert main(["compare", str(older), "--out", str(tmp_path / "cmp")]) == 0
    _edit_pack(older, _pack_all_correct_and_scores, sign=True)
    assert main(["compare", str(older), "--out", str(tmp_path / "cmp")]) == 2
    want = "stage-03.json: evals[0].score=1.0000 (color, generate, merged) but results.json's accuracy[2][0]="
    assert want in capsys.readouterr().err


# -- the weaker cases --------------------------------------------------------------------------------------


def test_compare_refuses_a_copy_of_a_run(runs, tmp_path, capsys):
    """A ``cp -r`` copy used to count as a second seed ("1, 1 ± 0.0")."""
    run = _copy(runs[0], tmp_path)
    copy = _copy(run, tmp_path, "copy")
    assert main(["compare", str(run), str(copy), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"{copy}: run_id=" in err and f"the same run as {run} (a copy of it)" in err


def test_an_out_holding_a_copied_checkpoint_is_refused_and_left_untouched(runs, tmp_path):
    """It used to be taken as a killed run's leftovers, and the copy deleted by the prune."""
    for name in ("task-03", "task-01"):
        out = tmp_path / name
        shutil.copytree(runs[0] / "checkpoints" / "task-03", out / "checkpoints" / name)
        before = _files(out)
        with pytest.raises(FileExistsError, match=r"is not empty and holds no mbf run \(checkpoints\)"):
            _run(out)
        assert _files(out) == before


def test_what_a_run_killed_before_its_first_commit_leaves_is_still_started_again(tmp_path, monkeypatch):
    from mbf.experiment import report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after task 1's checkpoint and predictions, before results.json

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(report, "write_run", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(out)
    assert (out / "checkpoints" / "task-01" / "continual.json").exists()
    assert not (out / "results.json").exists()
    assert _run(out)["complete"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task-03"]


def test_a_damaged_or_edited_zero_shot_cache_entry_is_named(tmp_path):
    """A malformed entry used to fail without the file's name; an edited one gave FWT -100 silently."""
    from mbf.experiment.zero_shot import zero_shot_records

    model, codec, tasks, cache = tiny_llama(), char_codec(), _tasks(), tmp_path / "cache"
    true = zero_shot_records(model, codec, tasks, OPTS, cache=cache, log=lambda s: None)
    (entry,) = cache.iterdir()
    good = entry.read_text()

    def again():
        return zero_shot_records(model, codec, tasks, OPTS, cache=cache, log=lambda s: None)

    assert again() == true
    entry.write_text(good[:-20])
    with pytest.raises(ValueError, match=rf"{entry.name}: zero-shot cache entry: not valid JSON .*delete"):
        again()
    edited = json.loads(good)
    edited["records"][0]["score"], edited["records"][0]["correct"] = 1.0, [1.0] * len(true[0]["correct"])
    entry.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"{entry.name}: its SHA-256 differs from its content"):
        again()
    edited["sha256"] = zero_shot._checksum(edited)
    edited["records"][0]["score"] = 0.5
    edited["sha256"] = zero_shot._checksum(edited)
    entry.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"{entry.name}: records\[0\].score=0.5 is not the mean"):
        again()
    edited.pop("sha256")  # an entry without its checksum (an older one) is never trusted: evaluated again
    entry.write_text(json.dumps(edited))
    assert again() == true and json.loads(entry.read_text())["sha256"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    model = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    run = tmp_path_factory.mktemp("cli") / "run"
    small = ["--suite", "conflict", "--n-train", "8", "--n-test", "4", "--max-steps", "1", "--batch-size",
             "4", "--r", "2", "--alpha", "4", "--threads", "1"]  # fmt: skip
    assert main(["continual", "--out", str(run), "--model", str(model), "--dtype", "float32", *small]) == 0
    return run, model, small


def test_the_command_refuses_a_switch_between_continual_and_multi_task_in_one_line(cli_run, tmp_path, capsys):
    """``--resume --method multi-task --accept-changes`` on a SLAO run used to exit 0 with "AA –%"."""
    run, model, small = cli_run
    run = _copy(run, tmp_path)
    argv = ["continual", "--out", str(run), "--model", str(model), *small, "--resume", "--accept-changes"]
    capsys.readouterr()
    assert main([*argv, "--method", "multi-task"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json: method: 'slao' -> 'multi-task'" in err

"""Run directories: one writer at a time, a user's files never touched, only our checkpoints pruned."""

import json
import multiprocessing as mp
import os

import pytest

from mbf.experiment import rundir


def _hold_lock(path, ready, release):
    with rundir.lock(path):
        ready.set()
        release.wait(10)


def test_a_second_writer_is_refused_and_a_dead_one_leaves_no_stale_lock(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(rundir.RunLocked, match=rf"being written by another mbf process \(pid {holder.pid}\)"):
        with rundir.lock(tmp_path):
            pass
    holder.kill()  # kill -9: the kernel drops its flock
    holder.join()
    with rundir.lock(tmp_path):  # a crashed holder leaves nothing stale behind
        assert (tmp_path / rundir.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_out_must_be_new_empty_or_a_run(tmp_path):
    rundir.check_out(tmp_path / "new", resume=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"is not empty and holds no mbf run \(notes\.txt\)"):
        rundir.check_out(tmp_path / "mine", resume=False)
    with pytest.raises(FileExistsError, match="is not empty and holds no mbf run"):
        rundir.check_out(tmp_path / "mine", resume=True)  # --resume does not make it a run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        rundir.check_out(tmp_path / "run", resume=False)
    rundir.check_out(tmp_path / "run", resume=True)
    # what a run killed before its first commit leaves is ours: started again, not refused
    killed = tmp_path / "killed"
    (killed / "checkpoints" / "task-01").mkdir(parents=True)
    (killed / rundir.LOCK_NAME).write_text("123\n")
    (killed / ".results.json.x8k2q1.json").write_text("{")
    (killed / "predictions").mkdir()  # the zero-shot's predictions precede the first commit
    (killed / "predictions" / "zero-shot.json").write_text("{}")
    (killed / "predictions" / ".stage-01.json.a1b2c3.json").write_text("{")
    rundir.check_out(killed, resume=False)
    (killed / "predictions" / "mine.json").write_text("{}")  # not a file a run writes: the user's
    with pytest.raises(FileExistsError, match=r"holds no mbf run \(predictions\)"):
        rundir.check_out(killed, resume=False)
    (killed / "predictions" / "mine.json").unlink()
    (killed / "checkpoints" / "task-final").mkdir()  # not a folder a run makes: the user's
    with pytest.raises(FileExistsError, match=r"holds no mbf run \(checkpoints\)"):
        rundir.check_out(killed, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        rundir.check_out(tmp_path / "file", resume=False)


def test_only_this_runs_checkpoints_are_pruned(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("task-01", "task-02", "task-03", "task-final", "task-2b", "mine"):
        (ckpts / name).mkdir(parents=True)
    rundir.prune_checkpoints(tmp_path, keep="task-03")
    assert sorted(p.name for p in ckpts.iterdir()) == ["mine", "task-03", "task-2b", "task-final"]


def test_a_users_file_inside_a_task_folder_is_never_deleted(tmp_path):
    """``checkpoints/task-07/notes.txt``: refused as --out, never pruned (it used to go after task 1)."""
    notes = tmp_path / "checkpoints" / "task-07" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match=r"holds no mbf run \(checkpoints\)"):
        rundir.check_out(tmp_path, resume=False)
    ours, library = tmp_path / "checkpoints" / "task-01", tmp_path / "checkpoints" / "task-04"
    for folder, run in ((ours, {"run_id": "r1"}), (library, None)):
        folder.mkdir()
        (folder / "continual.json").write_text(json.dumps({"run": run}))
        (folder / "adapters-0123456789ab.safetensors").write_bytes(b"")
        (folder / ".continual.json.k2j3.json").write_text("")  # a temporary a kill -9 left
    rundir.prune_checkpoints(tmp_path, keep="task-02", run={"run_id": "r1"})
    # this run's checkpoint goes; a checkpoint of no run (a library save copied in: issue 39) stays
    assert notes.read_text() == "my notes" and not ours.exists() and library.exists()


def test_the_eval_split_cannot_change_on_resume(tmp_path):
    """A test-split run resumed with ``--eval-split validation`` (and the reverse) is refused, even with
    ``accept_changes``: its later scores would be on another split than its first ones."""
    from mbf.experiment import results as results_file

    settings = {"method": "slao", "seed": 0, "tasks": ["a", "b"], "suite": "real", "order": "a,b"}
    results_file.write(tmp_path, results_file.new(settings))  # a test-split run: no eval_split field
    assert rundir.check_resume(tmp_path, settings) is not None
    for accept in (False, True):
        with pytest.raises(ValueError, match=r"eval_split: 'test' -> 'validation'.*drop --eval-split"):
            rundir.check_resume(tmp_path, {**settings, "eval_split": "validation"}, accept_changes=accept)
    results_file.write(tmp_path, results_file.new({**settings, "eval_split": "validation"}))
    assert rundir.check_resume(tmp_path, {**settings, "eval_split": "validation"}) is not None
    with pytest.raises(ValueError, match=r"'validation' -> 'test'.*pass --eval-split validation"):
        rundir.check_resume(tmp_path, settings, accept_changes=True)


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link"])
def test_a_lock_file_that_links_elsewhere_is_refused_and_what_it_points_to_is_untouched(tmp_path, kind):
    """The lock is opened without following a link: a ``.mbf-lock`` symlink's target used to be
    truncated and overwritten with the pid (a dangling one's created); a hard link's other name too."""
    out, target = tmp_path / "run", tmp_path / "notes.txt"
    out.mkdir()
    if kind != "dangling symlink":
        target.write_text("the user's notes\n")
    if kind == "hard link":
        os.link(target, out / rundir.LOCK_NAME)
    else:
        (out / rundir.LOCK_NAME).symlink_to(target)
    with pytest.raises(FileExistsError, match=rf"{out / rundir.LOCK_NAME} is a (symbolic|hard) link"):
        with rundir.lock(out):
            pass
    if kind == "dangling symlink":
        assert not target.exists() and not target.is_symlink()
    else:
        assert target.read_text() == "the user's notes\n"

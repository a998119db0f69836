"""``mbf sweep``: a config's errors name the field and value; the grid expands to the expected command
lines; the runner resumes as reports/run_job.sh did; a tiny sweep end to end (two methods side by side,
then a comparison); the committed configs under reports/sweeps/ load and expand."""

import json
from pathlib import Path

import pytest
from fixtures.tiny import save_tiny_checkpoint

from mbf.cli import main
from mbf.experiment import results as results_file
from mbf.experiment import sweep

ROOT = Path(__file__).parents[1]

SMALL = """
name = "small"
out = "{out}"
jobs = 2

[vars]
common = "--suite domains --threads 1"

[[stages]]
name = "lr"
out = "lr"
job = "{{method}}-lr{{lr}}"
args = "{{common}} --method {{method}} --lr {{lr}} --eval-split validation"

[[stages.grid]]
method = ["seq-lora", "slao"]
lr = ["1e-3", "3e-3"]

[[stages]]
name = "compare"
job = "{{method}}-s{{seed}}"
args = "{{common}} {{flags}} --seed {{seed}} --lr {{lr}}"
per_method = {{ lr = "lr/chosen.txt" }}
compare = [{{ runs = "run/*/", baseline = "seq-lora", out = "compare" }}]

[[stages.grid]]
seed = [0, 1]
variant = [{{ method = "seq-lora", flags = "--method seq-lora" }},
           {{ method = "slao", flags = "--method slao --schedule none" }}]
"""


def _config(tmp_path: Path, text: str = SMALL, **fields) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text.format(out=tmp_path / "out", **fields))
    return path


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("# stage")]


def test_the_grid_expands_to_the_command_lines(tmp_path, capsys):
    config = _config(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--stage", "lr", "--dry-run"]) == 0
    common = "mbf continual --suite domains --threads 1"
    assert _lines(capsys.readouterr().out) == [
        f"{common} --method {m} --lr {lr} --eval-split validation --out {out}/lr/run/{m}-lr{lr}"
        for m in ("seq-lora", "slao") for lr in ("1e-3", "3e-3")
    ]  # fmt: skip
    # the compare stage's rates are the lr stage's choice: shown as such until it is written
    assert main(["sweep", str(config), "--stage", "compare", "--dry-run"]) == 0
    assert f"--seed 1 --lr '<{out}/lr/chosen.txt:slao>' --out" in capsys.readouterr().out
    (out / "lr").mkdir(parents=True)
    (out / "lr" / "chosen.txt").write_text("seq-lora 0.003\nslao 0.001\n")
    (out / "run" / "slao-s0").mkdir(parents=True)  # a finished run: commented out, compared
    (out / "run" / "slao-s0" / "results.json").write_text('{"complete": true}')
    (out / "run" / "seq-lora-s1").mkdir(parents=True)  # a cut one: resumed
    (out / "run" / "seq-lora-s1" / "results.json").write_text('{"complete": false}')
    assert main(["sweep", str(config), "--stage", "compare", "--dry-run"]) == 0
    assert _lines(capsys.readouterr().out) == [
        f"{common} --method seq-lora --seed 0 --lr 0.003 --out {out}/run/seq-lora-s0",
        f"# complete: {common} --method slao --schedule none --seed 0 --lr 0.001 --out {out}/run/slao-s0",
        f"{common} --method seq-lora --seed 1 --lr 0.003 --out {out}/run/seq-lora-s1 --resume",
        f"{common} --method slao --schedule none --seed 1 --lr 0.001 --out {out}/run/slao-s1",
        f"mbf compare {out}/run/seq-lora-s1/ {out}/run/slao-s0/ --baseline seq-lora --out {out}/compare",
    ]
    assert main(["sweep", str(config), "--dry-run", "--only", "*-s1"]) == 0
    printed = _lines(capsys.readouterr().out)
    runs = [line.split("--out ")[1] for line in printed if line.startswith("mbf")]
    assert runs == [f"{out}/run/seq-lora-s1 --resume", f"{out}/run/slao-s1"]
    assert "--only *-s1: the stage's comparisons and later steps are left out" in printed[-1]


@pytest.mark.parametrize(
    "change, message",
    [
        (('out = "{out}"\n', ""), "sweep.out: missing"),
        (("jobs = 2", 'jobs = "two"'), "sweep.jobs: 'two' is not an integer"),
        (("jobs = 2", "jobs = 0"), "jobs: 0 must be >= 1"),
        (('name = "lr"\nout', 'name = "lr"\ngrids = 1\nout'), "stages[0].grids: unknown field (known: "),
        (('lr = ["1e-3", "3e-3"]', "lr = [[1]]"), "stages[0].grid[0].lr: [1] is not a string, number or"),
        (('lr = ["1e-3", "3e-3"]', "lr = []"), "stages[0].grid[0].lr: no value"),
        (('name = "compare"', 'name = "lr"'), "stages[1].name: 'lr' names two stages"),
        (('out = "compare"', 'outdir = "compare"'), "stages[1].compare[0].outdir: unknown field"),
        (("--lr {{lr}} --eval", "--lr {{rate}} --eval"), "stages[0].args: unknown placeholder {rate}"),
        (('"{{method}}-lr{{lr}}"', '"{{method}}"'), "stages[0].job: 'seq-lora' is two runs of the grid"),
        (("[vars]", "[vars]\nx = [1]"), "vars.x: [1] is not a string or number"),
        (("jobs = 2", "jobs = 2 ="), "not TOML"),
    ],
)
def test_config_errors_name_the_field_and_value(tmp_path, capsys, change, message):
    assert change[0] in SMALL
    config = _config(tmp_path, SMALL.replace(*change))
    assert main(["sweep", str(config), "--stage", "lr", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbf: error: {config}: ") and message in err


def test_stage_and_per_method_errors(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["sweep", str(config), "--stage", "train"]) == 2
    assert f"--stage train: {config} has no such stage (its stages: lr, compare)" in capsys.readouterr().err
    assert main(["sweep", str(config), "--stage", "compare"]) == 2  # not a dry run: the choice must exist
    assert f"{tmp_path}/out/lr/chosen.txt: missing" in capsys.readouterr().err
    (tmp_path / "out" / "lr").mkdir(parents=True)
    (tmp_path / "out" / "lr" / "chosen.txt").write_text("seq-lora 0.003\n")
    assert main(["sweep", str(config), "--stage", "compare", "--dry-run"]) == 2
    assert "stages[1].per_method.lr: no value for method 'slao' (lr/chosen.txt)" in capsys.readouterr().err
    reuse = SMALL + '[stages.reuse]\nfrom = "x"\nscript = "y.py"\nfields = []\nlike = "compare"\n'
    assert main(["sweep", str(_config(tmp_path, reuse)), "--dry-run"]) == 2
    assert "stages[1].reuse.like: 'compare' is not an earlier stage" in capsys.readouterr().err


def test_resume_skips_complete_runs_and_resumes_cut_ones_below_their_log(tmp_path, monkeypatch, capsys):
    """As reports/run_job.sh: complete: not run; cut: --resume, its log kept above; new: its log emptied."""
    calls = []

    def fake_mbf(argv, log, mode="w"):
        calls.append(argv)
        with open(log, mode) as f:
            f.write(f"args: {' '.join(argv)}\nAA 1.0\n")
        return 0

    monkeypatch.setattr(sweep, "_mbf", fake_mbf)
    out = tmp_path / "out" / "lr"
    for name, complete in (("seq-lora-lr1e-3", True), ("seq-lora-lr3e-3", False)):
        (out / "run" / name).mkdir(parents=True)
        (out / "run" / name / "results.json").write_text(json.dumps({"complete": complete}))
    (out / "logs").mkdir()
    for name in ("seq-lora-lr1e-3", "seq-lora-lr3e-3", "slao-lr1e-3"):
        (out / "logs" / f"{name}.log").write_text(f"the earlier {name}\n")
    assert main(["sweep", str(_config(tmp_path)), "--stage", "lr", "--jobs", "1"]) == 0
    assert [c[c.index("--out") :] for c in calls] == [
        ["--out", str(out / "run" / "seq-lora-lr3e-3"), "--resume"],
        ["--out", str(out / "run" / "slao-lr1e-3")],
        ["--out", str(out / "run" / "slao-lr3e-3")],
    ]
    assert (out / "logs" / "seq-lora-lr1e-3.log").read_text() == "the earlier seq-lora-lr1e-3\n"
    cut = (out / "logs" / "seq-lora-lr3e-3.log").read_text().splitlines()
    assert cut[0] == "the earlier seq-lora-lr3e-3" and cut[1].endswith(" resumed")
    assert cut[2].endswith("--resume")
    assert (out / "logs" / "slao-lr1e-3.log").read_text().startswith("args: continual --suite domains")
    printed = capsys.readouterr().out
    assert "start seq-lora-lr3e-3 (resumed)" in printed
    assert "done  slao-lr3e-3 rc=0 args: continual" in printed
    assert "start seq-lora-lr1e-3" not in printed


def test_a_failed_run_fails_the_stage_and_stops_the_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_mbf", lambda argv, log, mode="w": log.write_text("boom\n") and 1)
    assert main(["sweep", str(_config(tmp_path))]) == 1
    printed = capsys.readouterr().out
    assert "some runs failed" in printed and "stage lr failed: not run: compare" in printed


@pytest.mark.parametrize("path", sorted((ROOT / "reports" / "sweeps").glob("*.toml")), ids=lambda p: p.stem)
def test_the_committed_sweeps_load_and_expand(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = sweep.load(path.relative_to(ROOT))
    for stage in cfg["stages"]:
        jobs = sweep.expand(cfg, stage, dry_run=True)
        assert jobs and all(j.args[0] == "--suite" and "{" not in " ".join(j.args) for j in jobs)


def test_a_tiny_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """Two methods side by side (one step per task, the generated domains suite, a tiny local model),
    then a comparison; run again, nothing is re-run."""
    monkeypatch.setenv("MBF_CACHE", str(tmp_path / "cache"))
    model = save_tiny_checkpoint(tmp_path / "tiny")
    config = tmp_path / "tiny.toml"
    small = "--threads 1 --n-train 4 --n-test 2 --max-steps 1 --batch-size 2 --r 2 --alpha 4"
    config.write_text(f"""
name = "tiny"
out = "{tmp_path / "out"}"
jobs = 2
[[stages]]
name = "runs"
job = "{{method}}"
args = "--suite domains --model {model} --method {{method}} {small}"
compare = [{{ runs = "run/*/", baseline = "seq-lora", out = "compare" }}]
[[stages.grid]]
method = ["seq-lora", "slao"]
""")  # fmt: skip
    assert main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    for method in ("seq-lora", "slao"):
        assert results_file.read(out / "run" / method)["complete"]
        assert "AA " in (out / "logs" / f"{method}.log").read_text()
    assert "| slao |" in (out / "compare" / "compare.md").read_text()
    assert "start slao" in capsys.readouterr().out
    assert main(["sweep", str(config), "--only", "*"]) == 0  # (--only: the comparison is not redone)
    printed = capsys.readouterr().out
    assert "(2 complete, 0 cut)" in printed and "start" not in printed

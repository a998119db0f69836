"""Experiment grids as data: ``mbf sweep CONFIG`` runs one TOML file of ``reports/sweeps/``.

A config names the sweep's folder (``out``), how many runs go at once (``jobs``), strings its templates
share (``[vars]``) and its stages, run in order. A stage expands its ``[[stages.grid]]`` blocks (each
the product of its axes, the first key outermost; a scalar is a one-value axis; an axis of tables sets
each table's keys together) into runs ``OUT/STAGE_OUT/run/JOB`` of ``mbf continual ARGS``, where ``job``
and ``args`` are ``str.format`` templates over the axes, ``[vars]`` and ``per_method`` values (a table
method -> value, or a file of "METHOD VALUE" lines an earlier stage wrote). Then its ``[[stages.compare]]``
(``mbf compare``), its ``after`` commands and, with ``pack = true``, its runs' predictions packed.
``[stages.reuse]`` copies a finished run of another sweep instead of running it (reports/reuse_run.py
checks its settings). Paths are relative to the directory ``mbf sweep`` runs in. docs/sweeps.md has
the fields; reports/sweeps/*.toml are the committed sweeps.

The runner is resumable as reports/run_job.sh was: a run whose results.json says ``"complete": true`` is
skipped, one cut after a finished task continues with ``--resume`` below its own log
(``OUT/STAGE_OUT/logs/JOB.log``), any other starts afresh with its log emptied.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Job", "expand", "load", "run_sweep"]

_SCALAR = (str, int, float)
TOP = {"name": str, "description": str, "out": str, "jobs": int, "vars": dict, "stages": list}
STAGE = {"name": str, "description": str, "out": str, "job": str, "args": str, "grid": list,
         "per_method": dict, "reuse": dict, "compare": list, "after": list, "pack": bool}  # fmt: skip
REUSE = {"from": str, "script": str, "like": str, "match": list, "fields": list}
COMPARE = {"runs": str, "exclude": str, "baseline": str, "scorer": str, "out": str}
_NAMES = {str: "a string", int: "an integer", dict: "a table", list: "an array", bool: "true or false"}


def _check(path, where: str, table, schema: dict, required: tuple[str, ...]) -> dict:
    """``table`` with every key known, of its type, and every required one present (else ValueError)."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {where}: {table!r} is not a table")
    for key, value in table.items():
        if key not in schema:
            raise ValueError(f"{path}: {where}.{key}: unknown field (known: {', '.join(schema)})")
        kind = schema[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: {where}.{key}: {value!r} is not {_NAMES[kind]}")
    for key in required:
        if key not in table:
            raise ValueError(f"{path}: {where}.{key}: missing")
    return table


def load(path: str | Path) -> dict:
    """The sweep config at ``path``, checked (every error names the field and its value)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: its backport, if installed
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from mbf._optional import MissingDependency

            raise MissingDependency("mbf sweep needs Python >= 3.11, or tomli: pip install tomli") from None
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not TOML: {e}") from None
    _check(path, "sweep", cfg, TOP, ("name", "out", "stages"))
    if cfg.setdefault("jobs", 2) < 1:
        raise ValueError(f"{path}: jobs: {cfg['jobs']!r} must be >= 1")
    for key, value in cfg.setdefault("vars", {}).items():
        if not isinstance(value, _SCALAR):
            raise ValueError(f"{path}: vars.{key}: {value!r} is not a string or number")
    if not cfg["stages"]:
        raise ValueError(f"{path}: stages: no stage")
    names = set()
    for i, stage in enumerate(cfg["stages"]):
        where = f"stages[{i}]"
        _check(path, where, stage, STAGE, ("name", "job", "args", "grid"))
        if stage["name"] in names:
            raise ValueError(f"{path}: {where}.name: {stage['name']!r} names two stages")
        names.add(stage["name"])
        if not stage["grid"]:
            raise ValueError(f"{path}: {where}.grid: no grid block")
        for j, block in enumerate(stage["grid"]):
            if not isinstance(block, dict):
                raise ValueError(f"{path}: {where}.grid[{j}]: {block!r} is not a table")
            for axis, values in block.items():
                for v in values if isinstance(values, list) else [values]:
                    if not (isinstance(v, _SCALAR) or isinstance(v, dict) and
                            all(isinstance(x, _SCALAR) for x in v.values())):  # fmt: skip
                        raise ValueError(f"{path}: {where}.grid[{j}].{axis}: {v!r} is not a string, "
                                         "number or table of them")  # fmt: skip
                if values == []:
                    raise ValueError(f"{path}: {where}.grid[{j}].{axis}: no value")
        for key, source in stage.get("per_method", {}).items():
            if not isinstance(source, str | dict):
                raise ValueError(f"{path}: {where}.per_method.{key}: {source!r} is not a file or a table")
        for j, cmp in enumerate(stage.get("compare", [])):
            _check(path, f"{where}.compare[{j}]", cmp, COMPARE, ("runs", "out"))
        for j, cmd in enumerate(stage.get("after", [])):
            if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
                raise ValueError(f"{path}: {where}.after[{j}]: {cmd!r} is not an array of strings")
        if "reuse" in stage:
            reuse = _check(path, f"{where}.reuse", stage["reuse"], REUSE, ("from", "script", "fields"))
            if "like" in reuse and reuse["like"] not in names - {stage["name"]}:
                raise ValueError(f"{path}: {where}.reuse.like: {reuse['like']!r} is not an earlier stage")
    cfg["path"] = path
    return cfg


@dataclass
class Job:
    """One ``mbf continual`` run of a stage."""

    name: str
    values: dict[str, str]  # its axes' values, the vars and the per-method values
    args: list[str]  # mbf continual's flags, but --out and --resume
    run: Path
    log: Path

    def state(self) -> str:
        """``complete``, ``cut`` (a results.json that is not complete: resumed) or ``new``."""
        try:
            done = json.loads((self.run / "results.json").read_text())["complete"] is True
        except FileNotFoundError:
            return "new"
        except (ValueError, TypeError, KeyError):  # a damaged file: --resume says what is wrong with it
            done = False
        return "complete" if done else "cut"

    def argv(self) -> list[str]:
        return ["continual", *self.args, "--out", str(self.run)] + ["--resume"] * (self.state() == "cut")


def _fill(cfg, where: str, template: str, values: dict) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError) as e:
        raise ValueError(f"{cfg['path']}: {where}: unknown placeholder {{{e.args[0]}}} in {template!r} "
                         f"(known: {', '.join(values)})") from None  # fmt: skip


def _per_method(cfg, stage: dict, dry_run: bool) -> dict[str, dict[str, str]]:
    """key -> method -> value, from each ``per_method`` table or file (``"METHOD VALUE"`` lines)."""
    out = {}
    for key, source in stage.get("per_method", {}).items():
        if isinstance(source, dict):
            out[key] = {m: str(v) for m, v in source.items()}
            continue
        file = Path(cfg["out"]) / source
        if not file.is_file() and dry_run:  # shown as where it will come from: <FILE:METHOD>
            out[key] = _Missing(str(file))
            continue
        if not file.is_file():
            raise ValueError(f"{file}: missing (stages[{cfg['stages'].index(stage)}].per_method.{key}: an "
                             "earlier stage writes it; run that stage first)")  # fmt: skip
        pairs = [line.split() for line in file.read_text().splitlines() if line.strip()]
        if bad := [" ".join(p) for p in pairs if len(p) != 2]:
            raise ValueError(f"{file}: {bad[0]!r} is not a line 'METHOD VALUE'")
        out[key] = dict(pairs)
    return out


class _Missing(dict):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def __missing__(self, method):
        return f"<{self.file}:{method}>"


def expand(cfg: dict, stage: dict, dry_run: bool = False) -> list[Job]:
    """The stage's runs in the config's order (ValueError: an unknown placeholder, a method with no
    per-method value, two runs of one name)."""
    base, i = Path(cfg["out"]) / stage.get("out", "."), cfg["stages"].index(stage)
    lookups, jobs = _per_method(cfg, stage, dry_run), {}
    for block in stage["grid"]:
        axes = [v if isinstance(v, list) else [v] for v in block.values()]
        for combo in itertools.product(*axes):
            values = {k: str(v) for k, v in cfg["vars"].items()}
            for axis, v in zip(block, combo, strict=True):
                values.update({k: str(x) for k, x in v.items()} if isinstance(v, dict) else {axis: str(v)})
            for key, by_method in lookups.items():
                if values.get("method") not in by_method and not isinstance(by_method, _Missing):
                    raise ValueError(f"{cfg['path']}: stages[{i}].per_method.{key}: no value for method "
                                     f"{values.get('method')!r} ({stage['per_method'][key]})")  # fmt: skip
                values[key] = by_method[values.get("method")]
            name = _fill(cfg, f"stages[{i}].job", stage["job"], values)
            if name in jobs:
                raise ValueError(f"{cfg['path']}: stages[{i}].job: {name!r} is two runs of the grid")
            args = shlex.split(_fill(cfg, f"stages[{i}].args", stage["args"], values))
            jobs[name] = Job(name, values, args, base / "run" / name, base / "logs" / f"{name}.log")
    return list(jobs.values())


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)  # chosen.txt's 0.001 is the grid's 1e-3
    except ValueError:
        return a == b


def _reuse_argv(cfg: dict, stage: dict, job: Job) -> list[str] | None:
    """reports/reuse_run.py's command for a new run another sweep already made (None: nothing to reuse)."""
    reuse = stage.get("reuse")
    if reuse is None or job.state() != "new" or not (src := Path(reuse["from"]) / job.name).is_dir():
        return None
    argv = [sys.executable, reuse["script"]]
    if "like" in reuse:  # the earlier stage's run of the same values of `match`
        earlier = expand(cfg, next(s for s in cfg["stages"] if s["name"] == reuse["like"]))
        match = reuse.get("match", [])
        like = [j for j in earlier if all(_same(j.values.get(k, ""), job.values.get(k, "")) for k in match)]
        if not like:
            return None
        argv += ["--like", str(like[0].run)]
    fields = [_fill(cfg, "reuse.fields", f, job.values) for f in reuse["fields"]]
    return [*argv, str(src), str(job.run), *fields]


def compare_argv(cmp: dict, base: Path) -> tuple[list[str], str]:
    """``mbf compare``'s arguments for one ``[[stages.compare]]`` (runs: the glob's matches that hold a
    results.json, sorted, but ``exclude``'s; none when nothing matches) and the name of its log."""
    pattern = str(base / cmp["runs"]) + ("/" if cmp["runs"].endswith("/") else "")
    runs = [r for r in sorted(glob.glob(pattern)) if (Path(r) / "results.json").is_file()
            and not fnmatch.fnmatch(Path(r).name, cmp.get("exclude", "\0"))]  # fmt: skip
    flags = [x for k in ("baseline", "scorer") if k in cmp for x in (f"--{k}", cmp[k])]
    out = base / cmp["out"]
    name = out.name if cmp["out"] != "." else "compare"
    log = name if name.startswith("compare") else f"compare-{name}"
    return (["compare", *runs, *flags, "--out", str(out)] if runs else []), log


def _now(fmt: str = "%H:%M:%S") -> str:
    return time.strftime(fmt, time.gmtime())


def _mbf(argv: list[str], log: Path, mode: str = "w") -> int:
    """``mbf ARGV`` in a child process of this Python, its output into ``log``."""
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with open(log, mode) as f:
        return subprocess.run([sys.executable, "-m", "mbf.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode  # fmt: skip


def _say(text: str, _lock=threading.Lock()) -> None:
    with _lock:  # (one line at a time from the runs side by side)
        print(text, flush=True)


def run_job(job: Job) -> bool:
    """Run ``job`` as reports/run_job.sh did (see the module's docstring); True when it ended well."""
    state = job.state()
    if state == "complete":
        return True
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.run.parent.mkdir(parents=True, exist_ok=True)
    if state == "cut":  # the cut run's log stays above
        with open(job.log, "a") as f:
            f.write(f"--- {_now('%Y-%m-%dT%H:%M:%SZ')} resumed\n")
    _say(f"{_now()} start {job.name}{' (resumed)' if state == 'cut' else ''}")
    rc = _mbf(job.argv(), job.log, "a" if state == "cut" else "w")
    lines = job.log.read_text(errors="replace").splitlines()
    _say(f"{_now()} done  {job.name} rc={rc} {lines[-2] if len(lines) > 1 else ''}".rstrip())
    return rc == 0


def _stage(cfg: dict, stage: dict, jobs_at_once: int, only: str | None, dry_run: bool) -> bool:
    base = Path(cfg["out"]) / stage.get("out", ".")
    keep = only.split(",") if only else ["*"]
    jobs = [j for j in expand(cfg, stage, dry_run) if any(fnmatch.fnmatch(j.name, p) for p in keep)]
    states = [j.state() for j in jobs]
    _say(f"# stage {stage['name']}: {len(jobs)} run(s) in {base / 'run'} ({states.count('complete')} "
        f"complete, {states.count('cut')} cut), {jobs_at_once} at once")  # fmt: skip
    for job in jobs:  # (reports/reuse_run.py prints what it did)
        if (argv := _reuse_argv(cfg, stage, job)) is not None and dry_run:
            _say(f"# reuse if the same settings: {shlex.join(argv)}")
        elif argv is not None:
            subprocess.run(argv)
    ok = True
    if dry_run:
        for job, state in zip(jobs, states, strict=True):
            _say(("# complete: " if state == "complete" else "") + shlex.join(["mbf", *job.argv()]))
    else:
        with ThreadPoolExecutor(jobs_at_once) as pool:  # in the grid's order: a cut sweep holds the first
            ok = all(list(pool.map(run_job, jobs)))
        if not ok:
            _say(f"{_now()} some runs failed: their logs are in {base / 'logs'}")
    if only is not None:
        _say(f"# --only {only}: the stage's comparisons and later steps are left out")
        return dry_run or ok
    for cmp in stage.get("compare", []):
        argv, log = compare_argv(cmp, base)
        if not argv:
            _say(f"# no run matches {base}/{cmp['runs']} yet: no comparison {base / cmp['out']}")
        elif dry_run:
            _say(shlex.join(["mbf", *argv]))
        else:
            (base / "logs").mkdir(parents=True, exist_ok=True)
            rc = _mbf(argv, base / "logs" / f"{log}.log")
            _say(f"{_now()} {'FAILED' if rc else 'finished'}: {argv[-1]}/compare.md (log: logs/{log}.log)")
            ok = ok and rc == 0
    for cmd in stage.get("after", []):
        argv = [a.format(python=sys.executable, out=base) for a in cmd]
        if dry_run:
            _say(shlex.join(argv))
        else:
            ok = subprocess.run(argv).returncode == 0 and ok
    if stage.get("pack"):
        if dry_run:
            _say(f"# then the runs' predictions packed (reports/pack_predictions.py --remove {base}/run/)")
        elif ok:  # (as the scripts did: only when every run and comparison ended well)
            ok = _pack([j.run for j in jobs])
    return dry_run or ok


def _pack(runs: list[Path]) -> bool:
    """Each run's predictions/ packed into predictions.json.gz and removed (reports/pack_predictions.py)."""
    from mbf.experiment import predictions

    ok = True
    for run in runs:
        if (run / predictions.FOLDER).is_dir() or (run / predictions.PACK).is_file():
            try:
                path = predictions.pack(run, remove=True)
                _say(f"{path} ({path.stat().st_size} bytes)")
            except (ValueError, OSError) as err:
                _say(f"not packed: {err}")
                ok = False
    return ok


def run_sweep(config: str | Path, stage: str | None = None, dry_run: bool = False, jobs: int | None = None,
              only: str | None = None) -> int:  # fmt: skip
    """``mbf sweep``: every stage of ``config`` in order (or only ``stage``); 0 when every run, comparison
    and step ended well, else 1 (a failed stage stops the sweep)."""
    cfg = load(config)
    stages = cfg["stages"]
    if stage is not None:
        stages = [s for s in stages if s["name"] == stage]
        if not stages:
            known = ", ".join(s["name"] for s in cfg["stages"])
            raise ValueError(f"--stage {stage}: {config} has no such stage (its stages: {known})")
    for s in stages:
        if not _stage(cfg, s, jobs or cfg["jobs"], only, dry_run):
            if rest := stages[stages.index(s) + 1 :]:
                _say(f"{_now()} stage {s['name']} failed: not run: {', '.join(r['name'] for r in rest)}")
            return 1
    if not dry_run:
        _say(f"{_now()} sweep {cfg['name']} finished: {cfg['out']}")
    return 0

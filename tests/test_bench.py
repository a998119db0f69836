"""The measurement library (``mbf.bench``): rows appended as measured, one ratio convention, the
performance page's tables and the one plotter. Synthetic rows: nothing is timed here."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from mbf.bench import readme
from mbf.bench.plot import plot_file
from mbf.bench.rows import FLOOR, RowWriter, make_row, same_case, timed_row
from mbf.bench.timing import time_fn


def _row(provider, ms, op="lora_linear", M=2048, **extra):
    case = dict(
        op=op, shape="576->1536", M=M, r=16, mode="full", dtype="float32", device="Test CPU (2 cores)"
    )
    return timed_row(**case, provider=provider, timing={"ms": ms, "p20": ms, "p80": ms}, **extra)


def test_rows_reach_the_file_as_measured_with_their_ratio(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"op": "earlier", "provider": "x", "ms": 1.0}]))  # another run's row stays
    writer = RowWriter(path, {"lora_linear": FLOOR, "train_step": "peft"})
    writer.append(_row(FLOOR, 20.0, flops=4e10))
    assert len(json.loads(path.read_text())) == 2  # written before the next one is measured
    writer.append(_row("mbf-torch", 25.0))
    writer.append(_row("peft", 30.0, M=512))  # another case, whose floor was not measured
    writer.append(_row("peft", 8.0, op="train_step"))
    writer.append(_row("mbf", 6.0, op="train_step"))
    rows = json.loads(path.read_text())
    assert [r["op"] for r in rows] == [
        "earlier",
        "lora_linear",
        "lora_linear",
        "lora_linear",
        "train_step",
        "train_step",
    ]
    assert [r.get("ratio_to_floor") for r in rows[1:4]] == [1.0, 1.25, None]  # ms / ms of the floor
    assert rows[1]["tflops"] == pytest.approx(4e10 / 20e-3 / 1e12)
    assert (rows[5]["ratio_to_baseline"], rows[5]["baseline"]) == (0.75, "peft")  # larger = slower
    assert "ratio_to_floor" not in rows[5] and "ratio_to_baseline" not in rows[2]
    assert {"date", "versions"} <= set(rows[1]) and "torch" in rows[1]["versions"]
    summary = writer.summary()
    assert f"wrote 5 rows to {path}" in summary and "1.250× floor" in summary and "0.750× peft" in summary
    # a rerun of a case replaces its row (its ratio belongs to the new run); other rows stay
    RowWriter(path, {"lora_linear": FLOOR}).append(_row(FLOOR, 40.0, flops=4e10))
    rows = json.loads(path.read_text())
    assert len(rows) == 6 and [r["ms"] for r in rows if r["provider"] == FLOOR] == [40.0]


def test_a_non_finite_row_is_refused_and_the_file_kept(tmp_path):
    writer = RowWriter(tmp_path / "r.json", {"lora_linear": FLOOR})
    writer.append(_row(FLOOR, 20.0))
    with pytest.raises(ValueError):
        writer.append(_row("mbf-torch", float("nan")))
    assert len(json.loads((tmp_path / "r.json").read_text())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_same_case_ignores_the_provider_and_the_measurements():
    assert same_case(_row("a", 1.0), _row("b", 2.0))
    assert not same_case(_row("a", 1.0), _row("a", 1.0, M=512))
    assert not same_case(make_row(op="x", checkpointing=True), make_row(op="x", checkpointing=False))


def test_time_fn_on_cpu_counts_every_call():
    calls = []
    t = time_fn(lambda: calls.append(1), "cpu", warmup=2, rep=5)
    assert len(calls) == 7 and t["p20"] <= t["ms"] <= t["p80"]


def test_readme_tables_are_generated_between_the_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        {**_row(FLOOR, 20.0), "ratio_to_floor": 1.0},
        {**_row("peft", 8.0, op="train_step"), "ratio_to_baseline": 1.0, "baseline": "peft"},
        {**_row("mbf", 6.0, op="train_step", tokens_per_s=100.0, extra_keys=["tokens_per_s"])},
    ]
    rows[2].update(ratio_to_baseline=0.75, baseline="peft")
    (results / "dev-2026-01-01.json").write_text(json.dumps(rows))
    page = tmp_path / "README.md"
    page.write_text(f"# t\n\nkept\n{readme.START}\nold table\n{readme.END}\nkept too\n")
    readme.update_readme(page, results)
    text = page.read_text()
    assert (
        text.startswith("# t\n\nkept\n")
        and text.endswith(f"{readme.END}\nkept too\n")
        and "old table" not in text
    )
    assert "#### Test CPU (2 cores) — " in text and "**lora_linear**" in text and "**train_step**" in text
    assert "| floor | full | 576->1536 | 2048 | 16 | float32 | 20.000 |  | 1.000 |  |  |  |" in text
    assert "| 0.750 × peft |  | tokens_per_s=100 |" in text
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="perf markers"):
        readme.update_readme(tmp_path / "bad.md", results)


def test_the_committed_performance_tables_are_generated_from_bench_results():
    """docs/performance.md holds, between its perf markers, exactly what ``python -m mbf.bench.readme``
    writes from the committed bench/results/ (never typed by hand), and the README links to that page."""
    root = Path(__file__).parents[1]
    text = (root / "docs" / "performance.md").read_text()
    assert text.count(readme.START) == 1 and text.count(readme.END) == 1
    block = text.split(readme.START, 1)[1].split(readme.END, 1)[0]
    assert block == "\n" + readme.render(root / "bench" / "results") + "\n"
    assert readme.PAGE.relative_to(readme.RESULTS_DIR.parents[1]) == Path("docs/performance.md")
    assert "(docs/performance.md)" in (root / "README.md").read_text()


def test_one_plotter_draws_every_op(tmp_path):
    path = tmp_path / "dev.json"
    rows = [
        _row(FLOOR, 20.0),
        _row("mbf-torch", 25.0),
        _row("peft", 8.0, op="train_step", peak_mem_bytes=2**30),
    ]
    path.write_text(json.dumps(rows))
    pngs = plot_file(path)
    assert [p.name for p in pngs] == ["dev.lora_linear.png", "dev.train_step.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dev.json",
        "dev.lora_linear.png",
        "dev.train_step.png",
    ]


def test_train_step_rows_read_against_the_floor_and_peft(tmp_path):
    writer = RowWriter(tmp_path / "r.json", {"train_step": (FLOOR, "peft")})
    for provider, ms in ((FLOOR, 10.0), ("peft", 12.0), ("mbf", 11.0)):
        writer.append(_row(provider, ms, op="train_step"))
    mbf_row = json.loads((tmp_path / "r.json").read_text())[-1]
    assert mbf_row["ratio_to_floor"] == pytest.approx(1.1)
    assert (mbf_row["ratio_to_baseline"], mbf_row["baseline"]) == (pytest.approx(11 / 12), "peft")


def test_the_step_floor_backpropagates_to_the_embeddings_and_trains_nothing():
    import torch

    from mbf.bench.train_step import StepConfig, build_model

    cfg = StepConfig(model="smollm2-135m", layers=2, provider=FLOOR, seq=8, dtype="float32", device="cpu")
    model, params = build_model(cfg)
    assert params == [] and not any(p.requires_grad for p in model.parameters())
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
    ids = torch.randint(0, 1000, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen[0].grad is not None and seen[0].grad.abs().sum() > 0  # through both layers, to the bottom


def _choice(dtype, ms, dropped=None):
    from mbf.experiment.cpu_dtype import DtypeChoice

    key = {"cpu": "Test CPU", "cores": 2, "tokens": 512}
    return DtypeChoice(dtype, dict(ms), dict(dropped or {}), key, Path("/cache/dtype.json"), measured=False)


def test_the_bench_says_how_the_whole_step_compares_with_autos_pick():
    import torch

    from mbf.bench import suite

    def rows(**ms):
        return [
            {"op": "train_step", "provider": p, "dtype": d, "ms": t * (1 if p == "mbf" else 0.5)}
            for d, t in ms.items()
            for p in (FLOOR, "peft", "mbf")
        ] + [{"op": "task_boundary", "provider": "mbf", "dtype": "float16", "ms": 1.0}]

    probe = {"float32": 95.0, "bfloat16": 30.0}
    agree = suite.dtype_summary(rows(float32=2230.0, bfloat16=1600.0), _choice(torch.bfloat16, probe))
    assert agree == [
        "training step (mbf): float32 2,230 ms, bfloat16 1,600 ms; --dtype auto chose bfloat16 (from the "
        "linears' probe)"
    ]
    disagree = suite.dtype_summary(rows(float32=2230.0, bfloat16=3084.0), _choice(torch.bfloat16, probe))
    assert len(disagree) == 2 and disagree[1].startswith(
        "mbf: note: the whole step is faster in float32 than"
    )
    assert "pin --dtype float32" in disagree[1]
    within = suite.dtype_summary(rows(float32=2230.0, bfloat16=2200.0), _choice(torch.float32, probe))
    assert len(within) == 1  # 1.4 % apart: within the margin, no note
    assert suite.dtype_summary(rows(float32=2230.0), _choice(torch.float32, probe)) == []  # one dtype


def test_the_bench_dtypes_and_the_interleaved_cpu_rounds(monkeypatch):
    import torch

    from mbf.bench import suite, train_step
    from mbf.experiment import cpu_dtype, models

    # on CPU: float32 and each 16-bit dtype the probe timed to the end, whichever it picked
    measured = {"float32": 2230.0, "bfloat16": 3084.0}
    monkeypatch.setattr(cpu_dtype, "cpu_dtype", lambda *a, **k: _choice(torch.float32, measured))
    assert suite.bench_dtypes("auto", cuda=False) == ("float32", "bfloat16")  # bf16 lost: still checked
    measured["float16"] = 2000.0
    assert suite.bench_dtypes("auto", cuda=False) == ("float32", "bfloat16", "float16")
    dropped = {"bfloat16": "over 3x slower than float32 (...)", "float16": "not run here (...)"}
    monkeypatch.setattr(
        cpu_dtype, "cpu_dtype", lambda *a, **k: _choice(torch.float32, {"float32": 1.0}, dropped)
    )
    assert suite.bench_dtypes("auto", cuda=False) == ("float32",)  # an emulated step would take minutes
    assert suite.bench_dtypes("float16", cuda=False) == ("float16",)
    monkeypatch.setattr(models, "auto_dtype", lambda device: torch.bfloat16)  # CUDA: not measured
    assert suite.bench_dtypes("auto", cuda=True) == ("bfloat16",)

    configs = suite.default_suite(cuda=False, dtypes=("float32", "bfloat16"))
    assert [(c.dtype, c.provider) for c in configs[:3]] == [("float32", p) for p in (FLOOR, "peft", "mbf")]
    order, clock = [], [0.0]

    def fake_step_fn(cfg):  # a step of the floor takes 1 ms of the fake clock, PEFT's 2, mbf's 3
        def step():
            order.append(cfg.provider)
            clock[0] += 1e-3 * (1 + [FLOOR, "peft", "mbf"].index(cfg.provider))

        return step, []

    monkeypatch.setattr(train_step, "_step_fn", fake_step_fn)
    monkeypatch.setattr(train_step.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(
        train_step,
        "measure_step_isolated",
        lambda cfg: {"peak_mem_bytes": 7 if cfg.dtype == "float32" else 5},
    )
    rows = suite._cpu_rows(configs, rounds=2)
    warmup = [FLOOR, "peft", "mbf"]  # then each round in turn, the order rotated
    assert order == 2 * [*warmup, FLOOR, "peft", "mbf", "peft", "mbf", FLOOR]
    assert [(r["dtype"], r["provider"]) for r in rows] == [(c.dtype, c.provider) for c in configs]
    assert [len(r["samples"]) for r in rows] == [2] * 6 and rows[2]["rounds"] == 2
    assert [r["ms"] for r in rows] == pytest.approx([1, 2, 3, 1, 2, 3])
    assert [r["peak_mem_bytes"] for r in rows] == [7, 7, 7, 5, 5, 5]
    suite._cross_dtype_ratio(rows)
    assert rows[5]["ratio_to_peft_float32"] == pytest.approx(rows[5]["ms"] / rows[1]["ms"])  # bf16 mbf
    assert "ratio_to_peft_float32" not in rows[2]


def test_a_step_reports_its_bytes_by_kind_and_nf4_holds_the_weights_in_a_quarter():
    """The low-VRAM evidence's accounting on a 1-layer SmolLM2 (float32): the same adapters and AdamW
    state over both bases, the NF4 projections at ~0.52 bytes a weight against 4, activations saved."""
    from mbf.bench.train_step import MEMORY_KEYS, StepConfig, measure_step

    rows = {}
    providers = (
        ("mbf", "mbf-nf4", "peft-bnb4") if importlib.util.find_spec("bitsandbytes") else ("mbf", "mbf-nf4")
    )
    for provider in providers:
        cfg = StepConfig(layers=1, provider=provider, seq=8, dtype="float32", device="cpu", warmup=1, steps=1)
        rows[provider] = measure_step(cfg)
        assert set(MEMORY_KEYS) <= set(rows[provider]["extra_keys"])
    dense, nf4 = rows["mbf"], rows["mbf-nf4"]
    r, h, inter, kv = 16, 576, 1536, 192  # SmolLM2: every projection of the layer adapted
    adapter = (
        4 * r * sum(i + o for i, o in [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)])
    )
    assert dense["adapter_bytes"] == nf4["adapter_bytes"] == adapter
    assert dense["optimizer_bytes"] == nf4["optimizer_bytes"]
    assert 2 * adapter <= nf4["optimizer_bytes"] <= 2 * adapter + 14 * 8  # exp_avg, exp_avg_sq, a step each
    proj = 4 * (2 * h * h + 2 * h * kv + 3 * h * inter)  # the layer's projections in float32
    assert dense["weights_bytes"] - nf4["weights_bytes"] == pytest.approx(proj * (1 - 0.516 / 4), rel=0.01)
    assert 0 < nf4["activation_bytes"] and 0 < dense["activation_bytes"]
    assert dense["merged_adapter_bytes"] == nf4["merged_adapter_bytes"] == adapter  # SLAO's merged copy
    if "peft-bnb4" in rows:  # bitsandbytes' layout, absmax and nested constants included, is mbf's
        bnb = rows["peft-bnb4"]
        assert bnb["weights_bytes"] == nf4["weights_bytes"] and bnb["merged_adapter_bytes"] == 0
        assert bnb["adapter_bytes"] == adapter and bnb["optimizer_bytes"] == nf4["optimizer_bytes"]


def test_the_bytes_by_kind_get_their_own_panel(tmp_path, monkeypatch):
    from mbf.bench import plot

    panels = []
    real = plot._bytes_panel
    monkeypatch.setattr(plot, "_bytes_panel", lambda ax, rows: real(ax, rows) or panels.append(rows))
    held = dict(weights_bytes=2**20, adapter_bytes=2**10, optimizer_bytes=2**11, activation_bytes=2**21)
    rows = [_row("peft-bnb4", 8.0, op="train_step", **held), _row("mbf", 6.0, op="train_step")]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    plot_file(tmp_path / "q.json")
    assert [[r["provider"] for r in rows] for rows in panels] == [["peft-bnb4"]]  # the rows with bytes
    assert (tmp_path / "q.train_step.png").stat().st_size > 1000


def test_the_qlora_set_is_the_embedded_model_against_peft_bnb4_first(monkeypatch):
    import torch

    from mbf.bench import suite, train_step
    from mbf.experiment import models

    monkeypatch.setattr(models, "auto_dtype", lambda device: torch.float32)
    configs = suite.qlora_suite(cuda=False)
    assert [c.provider for c in configs] == ["peft-bnb4", "mbf-nf4", "peft", "mbf", "mbf"]  # baseline first
    assert {(c.model, c.dtype, c.targets, c.device) for c in configs[:4]} == {
        (train_step.EMBEDDED, "float32", "all-linear", "cpu")
    }
    dense16 = configs[4]  # the dense bf16 step a CPU without bf16 emulates: one step, alone
    assert (dense16.dtype, dense16.warmup, dense16.steps, dense16.targets) == ("bfloat16", 0, 1, "all-linear")
    on_gpu = suite.qlora_suite(cuda=True)
    assert {c.dtype for c in on_gpu} == {"bfloat16"} and len(on_gpu) == 4  # the dense step is timed there


def test_a_single_step_config_is_measured_once_alone_beside_the_interleaved_ones(monkeypatch):
    from mbf.bench import suite, train_step
    from mbf.bench.train_step import StepConfig

    base = StepConfig(layers=1, seq=8, dtype="float32", device="cpu", warmup=1, steps=1)
    configs = [replace(base, provider="peft"), replace(base, provider="mbf", dtype="bfloat16", warmup=0)]
    interleaved, alone = [], []
    row = {"ms": 1.0, "extra_keys": []}

    def isolated(cfg):
        alone.append(cfg)
        return {**row, "ms": 9.0, "peak_mem_bytes": 5}

    monkeypatch.setattr(train_step, "measure_interleaved", lambda cfgs, _: interleaved.extend(cfgs) or [row])
    monkeypatch.setattr(train_step, "measure_step_isolated", isolated)
    rows = suite._cpu_rows(configs, rounds=3)
    assert interleaved == configs[:1] and [c.warmup for c in alone] == [1, 0]  # peak of peft; bf16 once
    assert [r["ms"] for r in rows] == [1.0, 9.0]


def test_a_single_step_is_timed_under_the_memory_hooks_and_says_so():
    from mbf.bench.train_step import MEMORY_KEYS, StepConfig, measure_step

    row = measure_step(StepConfig(layers=1, provider="mbf", seq=8, dtype="float32", device="cpu",
                                  warmup=0, steps=1))  # fmt: skip
    assert row["single_step"] is True and "single_step" in row["extra_keys"]
    assert len(row["samples"]) == 1 and row["ms"] == row["samples"][0] > 0
    assert set(MEMORY_KEYS) <= set(row["extra_keys"]) and row["optimizer_bytes"] > 0  # AdamW ran in it
    assert row["activation_bytes"] > 0 and row["peak_mem_bytes"] > 0


def test_a_stage_whose_import_is_missing_is_skipped_and_recorded(tmp_path, monkeypatch, capsys):
    """The GPU run's preflight: pytest missing skips the two pytest stages (the others run), and
    bitsandbytes missing skips the PEFT + bitsandbytes rows; both are recorded in the timeline."""
    import importlib

    from mbf.bench import gpu, gpu_stages, preflight

    def importer(name):
        if name in ("pytest", "bitsandbytes"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return importlib.import_module(name)

    checks = preflight.check(dry_run=True, importer=importer)
    text = "\n".join(preflight.lines(checks))
    assert "preflight: pytest MISSING (No module named 'pytest') -> stages correctness, tests skipped" in text
    assert "preflight: bitsandbytes MISSING (No module named 'bitsandbytes'" in text
    assert "-> rows of peft-bnb4 skipped" in text and "preflight: peft " in text and "CUDA" not in text
    assert all(c.ok for c in checks if c.need.name not in ("pytest", "bitsandbytes")), text
    ran = []

    def stage(name):
        def body(ctx):
            ran.append(name)
            for provider in ("mbf-nf4", "peft-bnb4"):
                gpu_stages.run_case(ctx, f"{name} {provider}", lambda: None, provider)

        return body

    names = ("headline", "correctness", "nf4", "boundary", "train step", "tests")
    monkeypatch.setattr(gpu, "_bodies", lambda: {n: stage(n) for n in names})
    monkeypatch.setattr(gpu, "_use_dispatcher", lambda *a: None)  # the dispatcher stays the session's
    assert gpu.main(["--dry-run", "--out", str(tmp_path)], checks=checks) == 0
    assert ran == ["headline", "nf4", "boundary", "train step"]
    out = capsys.readouterr().out
    assert text in out and "== correctness: SKIPPED (preflight: pytest missing)" in out
    assert "nf4 peft-bnb4: SKIPPED (preflight: bitsandbytes missing)" in out
    timeline = {e["stage"]: e for e in json.loads((tmp_path / "timeline.json").read_text())}
    assert list(timeline) == ["preflight", "environment", *names]
    assert [c["need"] for c in timeline["preflight"]["checks"] if not c["ok"]] == ["bitsandbytes", "pytest"]
    assert {n: e["status"] for n, e in timeline.items()} == {
        "preflight": "done", "environment": "done", "headline": "done", "correctness": "skipped",
        "nf4": "done", "boundary": "done", "train step": "done", "tests": "skipped",
    }  # fmt: skip
    assert timeline["tests"]["missing"] == ["pytest"]
    assert timeline["nf4"]["skipped_cases"] == ["nf4 peft-bnb4"]


def test_a_run_without_its_package_says_why_and_measures_nothing(tmp_path, monkeypatch, capsys):
    from mbf.bench import preflight

    def importer(name):
        raise ModuleNotFoundError(f"No module named '{name.split('.')[0]}'")

    checks = preflight.check(dry_run=True, importer=importer)
    assert preflight.skipped_stages(checks, ["environment", "tests"]) == {
        "environment": ["torch", "triton", "safetensors", "mbf", "mbf.bench"],
        "tests": ["torch", "triton", "safetensors", "mbf", "pytest", "mbf.bench"],
    }
    assert preflight.lost_providers(checks) == {"peft": ["peft"], "peft-bnb4": ["peft", "bitsandbytes"]}
    lines = preflight.lines(checks)
    assert "preflight: torch MISSING (No module named 'torch') -> every stage skipped" in lines
    assert lines[8] == (
        "preflight: xdist MISSING (No module named 'xdist') -> the GPU tests run in one process instead of 8"
    )
    # bench/run_gpu.sh's entry: nothing to hand to the stages; the log and the timeline say why
    monkeypatch.setattr(preflight, "check", lambda dry_run: checks)
    assert preflight.main(["--dry-run", "--out", str(tmp_path)]) == 3
    assert "no stage can run" in capsys.readouterr().out
    assert (tmp_path / "run.log").read_text().startswith("\n".join(lines))
    (entry,) = json.loads((tmp_path / "timeline.json").read_text())
    assert (entry["stage"], entry["status"], len(entry["checks"])) == ("preflight", "failed", len(lines))


def _stub_kernel(x, BLOCK: "tl.constexpr"):  # noqa: F821 - read by the recorder, never run
    pass


def test_timed_loops_run_without_the_variant_hook(tmp_path, monkeypatch):
    """The variant counter sees a measurement's untimed first call only: every timed call (time_fn's
    loop, a stage's own timing inside, the breakdown's recorded calls) runs with the hook out."""
    import time
    import types

    import torch

    from mbf.bench import gpu, gpu_stages, launches, timing
    from mbf.functional import dispatch

    class Jit:  # stands in for Triton's JITFunction / InterpretedFunction
        fn = _stub_kernel

        def run(self, *args, **kwargs):
            hooked.append(type(self).run is not bare)

    bare, hooked = Jit.run, []
    monkeypatch.setattr(launches, "_jit_classes", lambda: [Jit])

    def launch():
        Jit().run(x=torch.zeros(2), BLOCK=16, grid=(1,))

    with launches.LaunchRecorder(cuda=False, timed=False) as counter:
        ctx = gpu_stages.Ctx(None, "cpu", "cpu", False, tmp_path, time.time() + 60, counter=counter)
        ctx.timing(launch)  # one counted call, then time_fn's 3 + 10 with the hook out
        assert hooked == [True] + [False] * 13
        hooked.clear()
        inner = types.SimpleNamespace(time_fn=timing.time_fn)  # a module that times inside
        with gpu_stages.timed_inside(ctx, inner):
            launch()
            inner.time_fn(launch, "cpu", warmup=1, rep=2)
        assert hooked == [True, False, False, False] and inner.time_fn is timing.time_fn
        hooked.clear()
        kernels = launches.breakdown(launch, cuda=False, reps=2, counter=counter)
        assert hooked == [True, True, True]  # the breakdown's own recorder is the one hook on its calls
        assert kernels["_stub_kernel"]["launches"] == 1
        hooked.clear()
        installed = []  # the run's dispatcher: auto's choice is timed with the hook out too
        monkeypatch.setattr(dispatch, "use_dispatcher", installed.append)
        gpu._use_dispatcher(counter, True)
        installed[0].timer(launch)
        assert hooked == [False]
        with counter.paused():
            assert Jit.run is bare
        assert Jit.run is not bare
    assert Jit.run is bare
    assert counter.variants == {("_stub_kernel", (("BLOCK", "16"),), ("torch.float32",))}


def test_the_bench_imports_without_peft_and_only_the_peft_rows_need_it():
    """A GPU image without peft still measures every other row: mbf.bench's import needs no peft; the
    PEFT provider says what is missing."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class NoPeft(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'peft' or name.startswith('peft.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'peft'\")\n"
        "sys.meta_path.insert(0, NoPeft())\n"
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'peft' else real(n, *a)\n"
        "import torch, mbf.bench\n"
        "from mbf.bench.providers import peft_lora\n"
        "try:\n"
        "    peft_lora(torch.nn.Linear(4, 4), 2)\n"
        "except ImportError as err:\n"
        "    print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: the PEFT rows of mbf.bench needs peft: pip install 'mbf-lora[app]'" in done.stdout

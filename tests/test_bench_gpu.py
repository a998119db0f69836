"""The GPU run's instruments, proven on the CPU: the per-kernel recorder, the Triton base GEMM row,
like-for-like adapter dtypes, the floor matching every adapter dtype, the import of a returned run
and the JUnit XML a stage leaves even when its time runs out. Nothing is timed against anything."""

import json
import sys
import time

import pytest
import torch
from conftest import assert_close

from mbf.bench import gpu_stages, readme
from mbf.bench.launches import LaunchRecorder, breakdown
from mbf.bench.layers import lora_case
from mbf.bench.plot import plot_file
from mbf.bench.rows import FLOOR, RowWriter, same_case, timed_row


def test_triton_gemm_is_the_base_gemm_alone():
    from mbf.bench.triton_gemm import triton_gemm

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x, W = torch.randn(37, 70, generator=g).to(dtype), torch.randn(45, 70, generator=g).to(dtype)
        assert_close(triton_gemm(x, W), x.double() @ W.double().T, dtype)


def test_the_recorder_times_every_kernel_and_counts_variants():
    fn, _ = lora_case("mbf-triton", 24, 40, 19, 4, "full", torch.float32, "cpu")
    with LaunchRecorder(cuda=False, timed=False) as counter:
        kernels = breakdown(fn, cuda=False, reps=1)
    # forward: down + linear; backward: dy + linear with the dA epilogue (another variant)
    assert {"_lora_down_kernel", "_lora_linear_kernel", "_lora_dy_kernel"} <= set(kernels)
    assert kernels["_lora_linear_kernel"]["launches"] == 2 and kernels["_lora_down_kernel"]["launches"] == 1
    assert len(counter.variants) == 4 and all(k["ms"] > 0 for k in kernels.values())
    torch_path = breakdown(lora_case("mbf-torch", 24, 40, 19, 4, "full", torch.float32, "cpu")[0], False, 2)
    assert "aten.mm" in torch_path and not any(k.startswith("_lora") for k in torch_path)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_peft_runs_with_the_adapter_dtype_it_is_compared_at(adapter_dtype, monkeypatch):
    seen = []
    orig = torch.nn.Linear.forward
    monkeypatch.setattr(
        torch.nn.Linear, "forward", lambda self, x: seen.append(self.weight.dtype) or orig(self, x)
    )
    fn, _ = lora_case("peft", 24, 40, 7, 4, "full", torch.bfloat16, "cpu", adapter_dtype=adapter_dtype)
    fn()
    assert seen[0] == torch.bfloat16 and seen[1:] == [adapter_dtype, adapter_dtype]  # base, lora_A, lora_B
    with pytest.raises(ValueError, match="triton-gemm is the forward GEMM alone; mode 'full'"):
        lora_case("triton-gemm", 24, 40, 7, 4, "full", torch.bfloat16, "cpu")


def _row(provider, ms, **extra):
    case = dict(op="lora_linear", shape="64->96", M=48, r=4, mode="full", dtype="bfloat16", device="Test CPU")
    return timed_row(**case, provider=provider, timing={"ms": ms, "p20": ms, "p80": ms}, **extra)


def test_the_floor_matches_every_adapter_dtype_and_adapter_dtypes_stay_apart(tmp_path):
    path = tmp_path / "dev.json"
    writer = RowWriter(path, {"lora_linear": FLOOR})
    writer.append(_row(FLOOR, 10.0))
    writer.append(_row("peft", 15.0, adapter_dtype="float32"))
    writer.append(_row("peft", 12.0, adapter_dtype="bfloat16"))
    rows = json.loads(path.read_text())
    assert [r["ratio_to_floor"] for r in rows] == [1.0, 1.5, 1.2] and len(rows) == 3
    assert not same_case(rows[1], rows[2]) and same_case(rows[0], rows[1])
    assert [p.name for p in plot_file(path)] == ["dev.lora_linear.png"]


def test_a_returned_run_is_imported_plotted_and_tabled(tmp_path):
    run = tmp_path / "out"
    run.mkdir()
    rows = [_row(FLOOR, 10.0), _row("mbf-triton", 12.0, adapter_dtype="float32")]
    kernels = {
        "_lora_linear_kernel": {"ms": 9.0, "launches": 2},
        "_lora_dy_kernel": {"ms": 3.0, "launches": 1},
    }
    rows.append({**rows[1], "op": "kernel_breakdown", "kernels": kernels})
    (run / "nvidia-h200-2026-12-02.json").write_text(json.dumps(rows))
    (run / "timeline.json").write_text(json.dumps([{"stage": "headline", "start_s": 1.0}]))
    (run / "run.log").write_text("log")
    results = tmp_path / "results"
    results.mkdir()
    assert [p.name for p in readme.import_run(run, results)] == ["nvidia-h200-2026-12-02.json"]
    assert (results / "gpu-runs" / "nvidia-h200-2026-12-02" / "timeline.json").exists()
    assert (results / "nvidia-h200-2026-12-02.kernel_breakdown.png").exists()
    text = readme.render(results)  # the timeline beside it is not a results file
    assert "| mbf-triton | 64->96 | 48 | 4 | float32 | `_lora_linear_kernel` | 9.000 | 75% | 2 |" in text
    with pytest.raises(FileNotFoundError, match="no results file"):
        readme.import_run(results / "gpu-runs" / "nvidia-h200-2026-12-02", results)


def test_a_stage_out_of_time_still_leaves_its_junit_xml(tmp_path, monkeypatch):
    test = tmp_path / "test_slow.py"
    test.write_text("import time\n\ndef test_sleeps():\n    time.sleep(60)\n")
    ctx = gpu_stages.Ctx(None, "cpu", "cpu", True, tmp_path, deadline=time.time() + 3)
    monkeypatch.setattr(gpu_stages, "ROOT", tmp_path)
    gpu_stages.run_pytest(ctx, [str(test)], "slow", {"PATH": "", "PYTHONPATH": ":".join(sys.path)})
    xml = (tmp_path / "slow.xml").read_text()
    assert "testsuite" in xml and not (tmp_path / "slow.log").exists()


def test_a_case_past_the_deadline_is_skipped_and_a_failing_one_reported(tmp_path, capsys):
    ctx = gpu_stages.Ctx(None, "cpu", "cpu", True, tmp_path, deadline=time.time() + 60)
    assert gpu_stages.run_case(ctx, "ok", lambda: 7) == 7
    assert gpu_stages.run_case(ctx, "bad", lambda: 1 / 0) is None
    ctx.deadline = time.time() - 1
    assert gpu_stages.run_case(ctx, "late", lambda: 7) is None
    out = capsys.readouterr().out
    assert (
        "bad: SKIPPED (ZeroDivisionError" in out and "late: SKIPPED (the stage's time limit is spent)" in out
    )

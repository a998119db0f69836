"""Every Triton kernel variant the launchers can produce compiles for sm_90 and sm_80, on this CPU.

``tools/compile_check.py`` (a developer tool of the repository, not of the installed package) drives
the public launchers over their options, records each launch instead of running it, and compiles it
with Triton's public compile API and bundled ptxas for real GPU targets: a layout Triton cannot
lower, a config over the shared memory of an H100 (232,448 B) or an A100 (166,912 B), or spills over
64 B fail here, where Triton's interpreter (the other kernel tests) cannot see them. It runs in a
subprocess without ``TRITON_INTERPRET`` (set for this session by conftest) from the repository root,
with the persistent cache ``~/.cache/mbf-lora/triton-<version>``: a warm rerun takes seconds.
``$MBF_COMPILE_PYTHONPATH`` runs it under another Triton (``make compile-subset`` runs the tool
itself under Triton 3.6).

The default run compiles the subset (every constexpr / dtype combination once, at its heaviest
config, on sm_90; the heaviest config of every kernel and dtype on sm_80) and the dropout backward at
every config, the variant that used to fail for sm_90 in 16-bit; ``-m compile_full`` compiles all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNEL_MODULES = ("lora", "nf4", "ortho", "merge")
ROOT = Path(__file__).resolve().parents[2]  # the repository root: tools/ lives there, not in the package


def _compile_check(tmp_path, *args: str, timeout: int) -> tuple[list[dict], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("MBF_COMPILE_PYTHONPATH"):  # another Triton first on the path
        env["PYTHONPATH"] = os.environ["MBF_COMPILE_PYTHONPATH"]
    out = tmp_path / "compile"
    cmd = [sys.executable, "-m", "tools.compile_check", "--out", str(out), "--quiet", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.with_suffix(".json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    bad = [r for r in report["results"] if not r["fits"]]
    assert not bad, "\n".join(f"sm_{r['cc']} {r['kernel']} {r['variant']} {r['config']}: {r}" for r in bad)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report["results"], report


def test_default_subset_compiles_and_fits(tmp_path):
    results, report = _compile_check(tmp_path, "--jobs", "2", timeout=1200)
    assert {r["cc"] for r in results} == {90, 80}
    # every kernel of every launcher module was reached, and every boolean constexpr both ways
    assert {v["kernel"] for v in report["variants"]} == set(report["kernels"])
    for kernel in report["kernels"]:
        flags = [w for v in report["variants"] if v["kernel"] == kernel for w in v["variant"].split()]
        values: dict[str, set[str]] = {}
        for w in flags:
            if "=" in w and ":" not in w:
                name, value = w.split("=", 1)
                values.setdefault(name, set()).add(value)
        booleans = [n for n, v in values.items() if v <= {"0", "1"}]  # R_PAD=1 is a rank, not a flag
        for name in booleans:
            assert values[name] == {"0", "1"}, (kernel, name, values[name])


def test_dropout_backward_compiles_at_every_config(tmp_path):
    # the dX GEMM with the dA epilogue and dropout: the i1 keep-mask fed two layouts and could not
    # pass through shared memory ("bit width must be a multiple of 8; got 1") for any 16-bit config
    variant = "HAS_MAIN=1 ACC_DA=1 HAS_DROPOUT=1 R_PAD=16 PRECISION=tf32x3 fp32:down,da i64:seed"  # 16-bit
    args = ("--modules", "lora", "--kernel", "_lora_linear", "--match", variant, "--targets", "90")
    results, _ = _compile_check(tmp_path, *args, "--jobs", "2", timeout=1200)
    assert {r["variant"].split(" | ")[1].split()[0] for r in results} == {"bf16", "fp16"}
    assert len({r["config"] for r in results}) >= 3


def test_dx_and_da_with_dropout_and_fp32_adapters_spill_nothing(tmp_path):
    # dX + dA + dropout with fp32 adapters over a 16-bit base: the 128 x 128 tile (8 warps) used 255
    # registers and spilled 16 B on sm_90 under Triton 3.6 (the GPU image's) and 1,140-1,196 B on sm_80
    # under 3.6 and 3.9; the pruner keeps it out (mbf/kernels/lora_configs.py), and no config left spills
    variant = "HAS_MAIN=1 ACC_DA=1 HAS_DROPOUT=1 R_PAD=16 fp32:down,up,upm,da"
    args = ("--modules", "lora", "--kernel", "_lora_linear", "--match", variant)
    results, _ = _compile_check(tmp_path, *args, "--jobs", "2", timeout=1200)
    assert {r["cc"] for r in results} == {90, 80} and len({r["config"] for r in results}) >= 5
    assert not [r for r in results if r["spills"]], [(r["cc"], r["config"], r["spills"]) for r in results]
    assert not [r for r in results if "BLOCK_M=128" in r["config"]]


@pytest.mark.compile_full
def test_every_variant_and_config_compiles_for_sm90_and_sm80(tmp_path):
    jobs = str(min(4, os.cpu_count() or 1))
    results, _ = _compile_check(tmp_path, "--full", "--jobs", jobs, timeout=4 * 3600)
    assert {r["cc"] for r in results} == {90, 80}

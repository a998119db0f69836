"""Shared benchmark plumbing: timing, peak memory, and the results file every benchmark appends to.

A row is a flat dict: op, provider, mode, shape, M, r, dtype, device, ms (median), p20, p80,
tflops or gbps, peak_mem_bytes, ratio_to_floor, versions and date. Rows go to
``bench/results/<device-slug>-<date>.json`` (one JSON list per device and day); ``bench/plot.py``
draws them and ``bench/readme_table.py`` turns every committed file into the README's tables.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if device is not None and torch.device(device).type == "cuda" or device is None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def results_path(device: str, date: str | None = None) -> Path:
    date = date or _dt.date.today().isoformat()
    return RESULTS_DIR / f"{slug(device)}-{date}.json"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "transformers", "peft", "bitsandbytes", "mbf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is simply not recorded
            pass
    return out


def append_rows(rows: list[dict], path: Path | None = None) -> Path:
    """Append rows to the day's results file for their device (atomic rewrite)."""
    if not rows:
        raise ValueError("no rows to write")
    path = path or results_path(rows[0]["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.extend(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(existing, f, indent=1)
    os.replace(tmp, path)
    return path


def make_row(**fields) -> dict:
    row = {"date": _dt.date.today().isoformat(), "versions": versions()}
    row.update(fields)
    return row


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, rep: int = 10) -> dict:
    """Median / p20 / p80 milliseconds of ``fn``: CUDA events via ``triton.testing.do_bench`` on GPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "p20": q[1], "p80": q[7]}


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA bytes allocated while ``fn`` runs (None on CPU: use a fresh process's RSS there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base

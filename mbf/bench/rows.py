"""Results files: where rows go, what every row records, and each row's ratio to its reference."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path

import torch

from mbf.io import atomic_write_json, versions

__all__ = [
    "CASE_FIELDS",
    "FLOOR",
    "RESULTS_DIR",
    "RowWriter",
    "case_label",
    "device_name",
    "make_row",
    "ratio_label",
    "ratio_labels",
    "results_path",
    "same_case",
    "slug",
    "timed_row",
]

FLOOR = "floor"  # the provider name of the plain frozen linear
# fields that identify what was measured: rows equal on all of them are the same case
CASE_FIELDS = (
    "op",
    "shape",
    "M",
    "r",
    "mode",
    "dtype",
    "adapter_dtype",
    "checkpointing",
    "targets",
    "dropout",
)
# a row without one of these (the floor: no adapter) matches every value of it
WILDCARD_FIELDS = ("adapter_dtype",)


def _default_results_dir() -> Path:
    # a source checkout writes next to the benchmarks; an installed package into ./bench/results
    repo = Path(__file__).resolve().parents[2] / "bench"
    return repo / "results" if repo.is_dir() else Path.cwd() / "bench" / "results"


RESULTS_DIR = Path(os.environ.get("MBF_BENCH_RESULTS", _default_results_dir()))


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model with its core count (``None``: CUDA when available)."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
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
    """``"Intel(R) Xeon(R) Processor (2 cores)"`` → ``"intel-r-xeon-r-processor-2-cores"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def results_path(device: str, date: str | None = None) -> Path:
    """``RESULTS_DIR/<device slug>-<date>.json`` (date: today)."""
    return RESULTS_DIR / f"{slug(device)}-{date or _dt.date.today().isoformat()}.json"


def make_row(**fields) -> dict:
    """A row: today's date and the package versions, then ``fields``."""
    return {"date": _dt.date.today().isoformat(), "versions": versions(), **fields}


def timed_row(*, timing: dict, flops: int | None = None, nbytes: int | None = None, **fields) -> dict:
    """``make_row`` of ``fields`` with ``timing``'s ms/p20/p80 and the rate they imply.

    Args:
        timing: ``time_fn``'s ``{"ms", "p20", "p80"}``.
        flops: useful floating-point operations of one call: adds ``tflops``.
        nbytes: minimal bytes moved by one call: adds ``gbps``.
    """
    seconds = timing["ms"] * 1e-3
    rates = {}
    if flops is not None:
        rates["tflops"] = flops / seconds / 1e12
    if nbytes is not None:
        rates["gbps"] = nbytes / seconds / 1e9
    return make_row(**fields, **rates, **timing)


def same_case(a: dict, b: dict) -> bool:
    """Whether two rows measured the same thing (possibly by different providers)."""
    return all(
        a.get(f) == b.get(f) or (f in WILDCARD_FIELDS and None in (a.get(f), b.get(f))) for f in CASE_FIELDS
    )


# the physical rate a row may carry, by preference, for the one-line summary
RATES = (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s"))


def case_label(row: dict, sep: str = "\n") -> str:
    """``4096->4096 / M=8192 r=16 / full`` (``p=0.1``: LoRA dropout, ``ckpt``: activation checkpointing)."""
    parts = [str(row.get("shape", "")), f"M={row.get('M')} r={row.get('r')}", str(row.get("mode", ""))]
    if row.get("dropout"):
        parts[1] += f" p={row['dropout']:g}"
    parts[-1] += f" {row['dtype']}" if row.get("dtype") else ""  # one case per dtype, side by side
    parts[-1] += f"/{row['adapter_dtype']} A,B" if row.get("adapter_dtype") else ""
    if row.get("checkpointing"):
        parts.append("ckpt")
    return sep.join(parts)


def ratio_label(row: dict) -> str:
    """``"1.180× floor"``, ``"0.920× peft"`` or ``""`` (the floor's when a row has both)."""
    return next(iter(ratio_labels(row)), "")


def ratio_labels(row: dict) -> list[str]:
    """Every ratio of a row: ``["1.180× floor", "0.920× peft"]``."""
    labels = []
    if row.get("ratio_to_floor") is not None:
        labels.append(f"{row['ratio_to_floor']:.3f}× floor")
    if row.get("ratio_to_baseline") is not None:
        labels.append(f"{row['ratio_to_baseline']:.3f}× {row['baseline']}")
    return labels


class RowWriter:
    """Appends rows to a results file as each is measured, with its ratio to its reference; a row of
    the same case and provider already in the file is replaced.

    Every ``append`` rewrites the file atomically (``mbf.io.atomic_write_json``): a benchmark that is
    stopped keeps every row measured so far, and a reader never sees half a file.

    Args:
        path: the results file (default: ``results_path`` of the first row's device).
        references: op → the provider its ratios are taken against, or a tuple of them: the floor
            and a baseline (``FLOOR`` gives ``ratio_to_floor``, any other ``ratio_to_baseline`` +
            ``baseline``). The reference rows of a case must be appended before the others; without
            one the ratio is None.
    """

    def __init__(
        self, path: Path | None = None, references: dict[str, str | tuple[str, ...]] | None = None
    ) -> None:
        self.path = path
        self.references = references or {}
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict) -> None:
        """Fill ``row``'s ratio, then append it to the file.

        Raises:
            ValueError: when a value is NaN or infinite (the file keeps the rows written before).
        """
        self._add_ratio(row)
        self.path = self.path or results_path(row["device"])
        existing = json.loads(self.path.read_text()) if self.path.exists() else []
        # a case measured again supersedes the earlier row: its ratios belong to the earlier run
        kept = [r for r in existing if not (r["provider"] == row["provider"] and same_case(r, row))]
        atomic_write_json([*kept, row], self.path)
        self.rows.append(row)

    def _add_ratio(self, row: dict) -> None:
        references = self.references.get(row["op"], ())
        for reference in (references,) if isinstance(references, str) else references:
            found = [r for r in [*self.rows, row] if r["provider"] == reference and same_case(r, row)]
            ratio = row["ms"] / found[0]["ms"] if found else None
            if reference == FLOOR:
                row["ratio_to_floor"] = ratio
            else:
                row.update(ratio_to_baseline=ratio, baseline=reference)

    def summary(self) -> str:
        """One line per row: case, provider, median ms, rate and ratio."""
        lines = [f"wrote {len(self.rows)} rows to {self.path}"]
        for r in self.rows:
            rate = next((f"{r[k]:9.3f} {unit}" for k, unit in RATES if r.get(k) is not None), "")
            case = f"{r['op']:>15} {case_label(r, sep=' '):<40} {r['provider']:>16}"
            lines.append(f"{case}: {r['ms']:9.3f} ms {rate}  {', '.join(ratio_labels(r))}")
        return "\n".join(lines)

"""What ``backend="auto"`` caches: a choice per case, in a file per device (``mbf.functional.dispatch``).

A case is keyed by (device name, input dtype, adapter dtype, dropout on/off, training or inference,
rank, in features, out features, tokens rounded up to a power of two, dense or NF4 base):
``case_key``. The file ``cache_dir()/dispatch/<device>-<hash>.json`` is keyed by the device and the
torch / triton / mbf versions and a hash of the kernel sources (``kernels_hash``): an upgrade or a
kernel edit measures again. It is written atomically and merged with what another process wrote
meanwhile; a file or entry that does not parse is ignored with a warning naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mbf.io import atomic_write_json

__all__ = [
    "Case",
    "adopt_rank0",
    "cache_path",
    "case_fields",
    "case_key",
    "case_of",
    "describe",
    "kernels_hash",
    "log_line",
    "read_choices",
    "versions_tag",
    "write_choices",
]


@dataclass(frozen=True)
class Case:
    """What decides the fastest path (the key's fields; see ``case_key``)."""

    device: str  # the GPU's name, or "cpu"
    dtype: str  # x's dtype (the base GEMMs')
    adapter_dtype: str  # A's dtype (the LoRA branch's)
    dropout: bool  # LoRA dropout on
    train: bool  # a gradient is wanted: forward + backward are timed, else the forward alone
    r: int
    K: int  # in features
    N: int  # out features
    M: int  # tokens, rounded up to a power of two (the shape bucket)
    base: str = "dense"  # "dense" or "nf4" (then the candidates are NF4 paths)


def _bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def case_fields(x: torch.Tensor, weight, A: torch.Tensor, dropout: float, train: bool, nf4: bool) -> tuple:
    """A call's ``Case`` fields but the device's name, as plain values (``torch.compile`` makes them
    the arguments of a constant function): dtypes, dropout on, train, r, K, N, M (not bucketed), base."""
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    dtype, adapter_dtype = (str(t.dtype).removeprefix("torch.") for t in (x, A))
    base = "nf4" if nf4 else "dense"
    return (
        dtype,
        adapter_dtype,
        dropout > 0.0,
        train,
        int(A.shape[0]),
        int(K),
        int(weight.shape[0]),
        int(M),
        base,
    )


def case_of(device: str, fields: tuple) -> Case:
    """The ``Case`` of ``case_fields`` on the device named ``device`` (M in its bucket)."""
    dtype, adapter_dtype, dropout, train, r, K, N, M, base = fields
    return Case(device, dtype, adapter_dtype, dropout, train, r, K, N, _bucket(M), base)


def case_key(case: Case) -> str:
    """``"NVIDIA H200|bfloat16|float32|p0|train|r16|4096x14336|M8192"`` (``|nf4`` appended over an NF4
    base): one cache entry's name."""
    mode = "train" if case.train else "infer"
    key = (
        f"{case.device}|{case.dtype}|{case.adapter_dtype}|p{int(case.dropout)}|{mode}|r{case.r}|"
        f"{case.K}x{case.N}|M{case.M}"
    )
    return key + ("|nf4" if case.base == "nf4" else "")


def describe(case: Case) -> str:
    """``4096→14336 r16 bfloat16 M≤8192 train`` for the one-line log."""
    mode = "train" if case.train else "infer"
    base = " nf4" if case.base == "nf4" else ""
    drop = " dropout" if case.dropout else ""
    return f"{case.K}→{case.N}{base} r{case.r} {case.dtype} M≤{case.M} {mode}{drop}"


def log_line(case: Case, entry: dict) -> str:
    """``mbf: chose triton for 4096→4096 r16 bfloat16 M≤8192 train in 1.2 s (torch 1 ms, …)``."""
    times = ", ".join(f"{k} {v:.3g} ms" for k, v in entry["ms"].items())
    skipped = f"; skipped {', '.join(entry['notes'])}" if entry["notes"] else ""
    return (
        f"mbf: chose {entry['backend']} for {describe(case)} in {entry.get('seconds', 0):.1f} s "
        f"({times}; margin {100 * entry['margin']:.1f} %{skipped})"
    )


@functools.lru_cache(maxsize=1)
def kernels_hash() -> str:
    """sha256 (12 hex digits) of the kernel sources and their configs (``mbf.kernels``' files) and of
    the Python paths they are measured through (``mbf.functional``): an edit to any of them measures
    again instead of trusting a choice made for other code."""
    import importlib.util

    digest = hashlib.sha256()
    folders = []
    for pkg in ("mbf.kernels", "mbf.functional"):
        spec = importlib.util.find_spec(pkg)
        folders += list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def versions_tag(device: str, kernels: str) -> str:
    """``device|torch|triton|mbf-lora|kernels <hash>``: what a cache file was measured under."""
    parts = [device, torch.__version__]
    for dist in ("triton", "mbf-lora"):
        try:
            from importlib import metadata

            parts.append(metadata.version(dist))
        except Exception:  # noqa: BLE001 - a missing distribution is part of the tag, not an error
            parts.append("-")
    parts.append(f"kernels {kernels}")
    return "|".join(parts)


def cache_path(folder: Path, device: str, tag: str) -> Path:
    """``folder/<device>-<hash of tag>.json``: the cache file of ``device`` under ``tag``."""
    digest = hashlib.sha256(tag.encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    return folder / f"{name}-{digest}.json"


def read_choices(path: Path, tag: str, device: str, valid: Callable[[str, object], bool]) -> dict[str, dict]:
    """The entries of the cache file ``path`` if it was written under ``tag`` (else none, with a
    warning); an entry whose backend ``valid(key, backend)`` refuses is dropped with a warning."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("tag") != tag:
            raise ValueError("not a dispatch cache of this device, these versions and kernels")
        if not isinstance(data.get("choices"), dict):
            raise ValueError("no 'choices' object")
    except (OSError, ValueError, RecursionError) as err:
        warnings.warn(f"{path}: dispatch cache ignored ({err}); it will be measured again", stacklevel=4)
        return {}
    kept = {}
    for key, entry in data["choices"].items():
        # an entry naming a backend this install lacks (a removed path), or not an object, is
        # measured again
        if isinstance(entry, dict) and valid(key, entry.get("backend")):
            kept[key] = {**entry, "device": device}
        else:
            warnings.warn(f"{path}: entry {key!r} ignored (not a choice of this install)", stacklevel=4)
    return kept


def write_choices(path: Path, tag: str, device: str, mine: dict[str, dict], valid) -> None:
    """Write this process's choices ``mine`` (those of ``device``) under ``tag`` atomically, merged
    over what the file holds now (another process may have added its own); warns, never raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller was warned when it was read
        merged = {**read_choices(path, tag, device, valid), **{k: v for k, v in mine.items()
                                                                if v.get("device") == device}}  # fmt: skip
    try:
        atomic_write_json({"tag": tag, "choices": merged}, path)
    except OSError as err:
        warnings.warn(f"{path}: dispatch cache not written ({err}); the choice holds in memory", stacklevel=4)


def adopt_rank0(choices: dict[str, dict], lock, group=None) -> int:
    """Every rank adopts rank 0's ``choices`` (a collective; see ``dispatch.agree``): how many of this
    rank's changed. ``lock`` guards ``choices``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    with lock:
        box = [{k: dict(v) for k, v in choices.items()}]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    changed = 0
    with lock:
        for key, entry in box[0].items():
            if key not in choices or choices[key]["backend"] != entry["backend"]:
                changed += key in choices
                choices[key] = {**entry, "from_rank0": True}
    return changed

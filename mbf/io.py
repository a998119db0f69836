"""Files: one atomic writer (a crash never leaves a half-written file), safetensors, versions, cache dir;
and the process's peak resident memory, which results and benchmarks record beside them."""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "load_safetensors",
    "peak_rss",
    "reset_peak_rss",
    "versions",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` by calling ``write(tmp)`` on a sibling temporary file, then renaming it.

    Readers see the old file or the new one, never a mix; the data reaches the disk (fsync) before
    the rename, and the file gets the permissions of a plain ``open`` under the user's umask. The
    temporary name is unique, so two writers never share it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the user's group
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(data, path: str | Path, indent: int = 1) -> Path:
    """JSON with ``allow_nan=False``: a NaN or inf is an error here, not an invalid file later."""
    return atomic_write_text(json.dumps(data, indent=indent, allow_nan=False), path)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_json_object(path: str | Path, what: str = "", hint: str = "") -> dict:
    """The JSON object in file ``path``.

    Raises:
        ValueError: not UTF-8, not valid JSON, or not an object; the message names the file, then ``what``
            (e.g. "zero-shot cache entry "), and ends with ``hint`` (what to do about it).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what}not UTF-8 text (byte {err.start}: {err.reason}){hint}") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: {what}not valid JSON at line {err.lineno} column {err.colno}: {err.msg}{hint}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what}expected a JSON object, got {type(data).__name__}{hint}")
    return data


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def cache_dir() -> Path:
    """``$MBF_CACHE``, else ``$XDG_CACHE_HOME/mbf-lora``, else ``~/.cache/mbf-lora``."""
    if os.environ.get("MBF_CACHE"):
        return Path(os.environ["MBF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mbf-lora"


def versions() -> dict[str, str]:
    """Versions of Python and of the installed packages that shape a result (absent ones left out)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("mbf-lora", "triton", "transformers", "peft", "bitsandbytes"):
        try:
            out[dist.replace("mbf-lora", "mbf")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def reset_peak_rss() -> None:
    """Reset the process's RSS high-water mark (Linux: ``5`` into /proc/self/clear_refs), so that
    ``peak_rss`` reports the peak of what runs next (e.g. training steps, not loading the model, which
    otherwise sets it for every provider alike). Does nothing where the kernel does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident bytes of this process since the last ``reset_peak_rss`` (``VmHWM``), or over its
    life where /proc is not there (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

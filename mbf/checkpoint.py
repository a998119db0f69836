"""The on-disk format of a ``ContinualLoRA`` checkpoint: written crash-safe, read with every field checked.

A checkpoint is a directory holding

    continual.json                      the commit point: written last, atomically (schema below)
    adapters-<token>.safetensors        the four adapter tensors of every layer, plus a strategy's own
                                        (``<layer>.<name>``; a new token per save)

``continual.json`` (``"format": "mbf-continual-checkpoint/1"``)::

    strategy        the strategy that saved it (``mbf.strategies``; absent in older files: "slao")
    task_index      int ≥ 0: finished tasks
    in_task         bool: saved inside a task (resumes there, not at its start)
    config          ContinualConfig fields ("slao"); null for another strategy, whose config fields are
                    in strategy_options and its JSON state (if any) in strategy_state
    lora_config     LoRAConfig fields, or null when the model was not injected by mbf.inject
    run             the identity of the ``mbf continual`` run that saved it (results.json's run_id, method,
                    seed, order, tasks, model and data fingerprints; ``bound_to_run``), or null (a save
                    outside a run); absent in older files
    tensors_file    the safetensors file of this save
    tensors_sha256  hex SHA-256 of that file (required): flipped bytes are caught on load, not trained on

The tensor file's safetensors metadata holds ``"mbf": FORMAT`` and ``"mbf_fields"``: the SHA-256 of each
field above but the last two (canonical JSON). Through ``tensors_sha256`` they cover the whole
``continual.json``: a field edited or dropped (``strategy_state``, ``config``, ``in_task``, ``run``...)
is refused on load, named. Files older than ``mbf_fields`` lack it: their tensors alone are checked.

Until ``continual.json`` is replaced, the previous save's json and tensors stay together, so a crash
at any point leaves a loadable checkpoint; the previous tensor file (the one the replaced json named,
never another file of the directory) is removed only afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mbf.config import LoRAConfig
from mbf.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json_object

__all__ = [
    "FORMAT", "STATE_KEYS", "Checkpoint", "bound_to_run", "check_lora_config", "read_checkpoint", "read_meta",
    "saved_strategy", "state_pairs", "write_checkpoint",
]  # fmt: skip

FORMAT = "mbf-continual-checkpoint/1"
META = "continual.json"
STATE_KEYS = ("lora_A", "lora_B", "merged_A", "merged_B")  # a layer's tensors in a checkpoint
_TENSORS_FILE = re.compile(r"adapters-[0-9a-f]{8,64}\.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds (validated when read)."""

    task_index: int  # finished tasks
    in_task: bool  # saved inside a task
    # SLAO's ContinualConfig (read: as read_checkpoint's config_class makes it; its fields when none is
    # given); None for another strategy (its fields: options)
    config: Any
    lora_config: LoRAConfig | None  # None: the model was not injected by mbf.inject
    tensors: dict[str, torch.Tensor]  # "<layer>.<lora_A|lora_B|merged_A|merged_B>", a strategy's own
    strategy: str = "slao"  # the strategy that saved it (its class's strategy_name)
    options: dict | None = None  # another strategy's config fields
    state: dict | None = None  # another strategy's JSON state beside its tensors
    run: dict | None = None  # the identity of the run that saved it (None: bound_to_run's, if any)


# the run whose checkpoints are being written (``bound_to_run``): strategies save without knowing it
_RUN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mbf_checkpoint_run", default=None)


@contextlib.contextmanager
def bound_to_run(identity: dict) -> Iterator[None]:
    """Every checkpoint written inside the block carries ``identity`` as its ``run`` field (``mbf
    continual`` binds its run's: a checkpoint copied in from another run is refused on resume)."""
    token = _RUN.set(dict(identity))
    try:
        yield
    finally:
        _RUN.reset(token)


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, allow_nan=False).encode()


# continual.json's fields that the tensor file's metadata does not cover: they name and check that file
_UNCOVERED = frozenset({"tensors_file", "tensors_sha256"})


def _field_digests(meta: dict) -> dict[str, str]:
    """SHA-256 of each of ``meta``'s fields but ``_UNCOVERED`` (what the tensor file's metadata holds)."""
    return {k: hashlib.sha256(_canonical(v)).hexdigest() for k, v in meta.items() if k not in _UNCOVERED}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into directory ``path`` (created); see the module docstring for the guarantees."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    previous = _previous_tensors_file(path)
    tensors_file = f"adapters-{uuid.uuid4().hex[:12]}.safetensors"
    meta = {
        "format": FORMAT,
        "strategy": ckpt.strategy,
        "task_index": ckpt.task_index,
        "in_task": ckpt.in_task,
        "config": None if ckpt.config is None else ckpt.config.to_dict(),
        "strategy_options": ckpt.options,
        "strategy_state": ckpt.state,
        "lora_config": None if ckpt.lora_config is None else ckpt.lora_config.to_dict(),
        "run": ckpt.run if ckpt.run is not None else _RUN.get(),
    }
    fields = json.dumps(_field_digests(meta), sort_keys=True)
    atomic_save_safetensors(ckpt.tensors, path / tensors_file, metadata={"mbf": FORMAT, "mbf_fields": fields})
    meta.update(tensors_file=tensors_file, tensors_sha256=_sha256(path / tensors_file))
    atomic_write_json(meta, path / META, indent=2)
    # the file the replaced continual.json named, and orphans of saves killed before their commit
    # (marked as ours inside the file): never another file of the directory, whatever its name
    for stale in path.glob("adapters-*.safetensors"):
        if stale.name != tensors_file and (stale.name == previous or _written_here(stale)):
            stale.unlink(missing_ok=True)
    return path


def _written_here(file: Path) -> bool:
    """True for a tensor file that ``write_checkpoint`` wrote (its safetensors metadata says so)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("mbf") == FORMAT
    except Exception:  # not a safetensors file at all: a user's
        return False


def _previous_tensors_file(path: Path) -> str | None:
    """The tensor file of the checkpoint already in ``path`` (None: none, or not readable as one)."""
    try:
        name = json.loads((path / META).read_text(encoding="utf-8")).get("tensors_file")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _TENSORS_FILE.fullmatch(name) else None


def _read_meta(path: Path) -> tuple[dict, Path]:
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a ContinualLoRA checkpoint (no {META})")
    meta = read_json_object(meta_path)
    strategy = meta.get("strategy", "slao")  # files older than the field were all SLAO's
    if not isinstance(strategy, str):
        raise ValueError(f"{meta_path}: strategy={strategy!r} must be a name")
    return meta, meta_path


def read_meta(path: str | Path) -> tuple[dict, Path]:
    """``(continual.json's fields, its path)`` of the checkpoint in ``path``, unchecked but for being a JSON
    object (``read_checkpoint`` checks them all against the tensor file)."""
    return _read_meta(Path(path))


def saved_strategy(path: str | Path) -> str:
    """The name of the strategy that saved the checkpoint in ``path`` (its tensors are not read).

    Raises:
        FileNotFoundError, ValueError: as ``read_checkpoint``.
    """
    return _read_meta(Path(path))[0].get("strategy", "slao")


def read_checkpoint(
    path: str | Path, strategy: str | None = "slao", config_class: type | None = None
) -> Checkpoint:
    """Read and validate the checkpoint in directory ``path``.

    Args:
        strategy: the strategy expected to have saved it (None: any).
        config_class: what SLAO's ``config`` field is read as (``config_class.from_dict``, checked before the
            tensors are read; ``mbf.strategies.slao.ContinualConfig``); None: its fields as saved.

    Raises:
        FileNotFoundError: no ``continual.json`` (or its tensor file) there.
        ValueError: a malformed field, a corrupted or modified tensor file, non-finite values, another
            strategy's checkpoint (every message names the file and the field).
    """
    path = Path(path)
    meta, meta_path = _read_meta(path)
    saved = meta.get("strategy", "slao")
    if strategy is not None and saved != strategy:
        raise ValueError(
            f"{meta_path}: saved by the {saved!r} strategy, not {strategy!r}; load it with "
            "mbf.strategies.load_strategy"
        )
    task_index, in_task = meta.get("task_index"), meta.get("in_task", False)
    if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
        raise ValueError(f"{meta_path}: task_index={task_index!r} must be an integer >= 0")
    if not isinstance(in_task, bool):
        raise ValueError(f"{meta_path}: in_task={in_task!r} must be true or false")
    options, state, run = meta.get("strategy_options"), meta.get("strategy_state"), meta.get("run")
    for key, value in (("strategy_options", options), ("strategy_state", state), ("run", run)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{meta_path}: {key}={value!r} must be a JSON object or null")
    try:
        # "options": the name of the same fields before ContinualConfig existed
        fields = meta.get("config", meta.get("options"))
        config = None if saved != "slao" else config_class.from_dict(fields) if config_class else fields
        lora = meta.get("lora_config")
        lora_config = None if lora is None else LoRAConfig.from_dict(lora)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: {err}") from err
    tensors = _read_tensors(path, meta, meta_path)
    return Checkpoint(task_index, in_task, config, lora_config, tensors, saved, options, state, run)


def _read_tensors(path: Path, meta: dict, meta_path: Path) -> dict[str, torch.Tensor]:
    name = meta.get("tensors_file")
    if not isinstance(name, str) or not _TENSORS_FILE.fullmatch(name):
        raise ValueError(f"{meta_path}: tensors_file={name!r} is not an adapters-<hex>.safetensors name")
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: the tensor file named by {meta_path} is missing")
    expected = meta.get("tensors_sha256")
    if not (isinstance(expected, str) and re.fullmatch(r"[0-9a-f]{64}", expected)):
        raise ValueError(
            f"{meta_path}: tensors_sha256={expected!r} must be the hex SHA-256 of {name}; without it the "
            "tensors cannot be checked"
        )
    if _sha256(file) != expected:
        raise ValueError(f"{file}: SHA-256 differs from {meta_path}: the file was modified or corrupted")
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = (f.metadata() or {}).get("mbf_fields")
        tensors = load_safetensors(file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: cannot be read as safetensors ({err})") from err
    if saved is not None:  # older files lack it: their tensors alone are checked
        try:
            saved = json.loads(saved)
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"{file}: its mbf_fields metadata is not a JSON object")
        now = _field_digests(meta)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ValueError(
                f"{meta_path}: {', '.join(changed)}: not what was saved with {name} (whose metadata holds "
                "each field's SHA-256): continual.json was edited after mbf wrote it"
            )
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{file}: tensor {key} has non-finite values")
    return tensors


def state_pairs(
    layers: dict, tensors: dict[str, torch.Tensor], keys: tuple[str, ...] = STATE_KEYS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(layer tensor, saved tensor)`` for every ``keys`` tensor of ``layers``, all checked first.

    Raises:
        KeyError: a LoRA tensor of these layers is missing, or ``tensors`` has one they lack.
        ValueError: a saved tensor's shape differs from the layer's (all name the tensor).
    """
    pairs = []
    for name, layer in layers.items():
        for key in keys:
            full = f"{name}.{key}"
            if full not in tensors:
                raise KeyError(f"{full}: missing from the saved state")
            dst = getattr(layer, key)
            if tuple(tensors[full].shape) != tuple(dst.shape):
                raise ValueError(f"{full}: saved shape {tuple(tensors[full].shape)} != {tuple(dst.shape)}")
            pairs.append((dst, tensors[full]))
    unexpected = sorted(set(tensors) - {f"{n}.{k}" for n in layers for k in keys})
    if unexpected:
        raise KeyError(f"{unexpected[0]}: in the saved state but not a LoRA tensor of this model")
    return pairs


def check_lora_config(path, saved: LoRAConfig | None, current: LoRAConfig | None) -> None:
    """Raise ValueError unless a checkpoint's LoRAConfig fits the model's (when both are known)."""
    if saved is None or current is None:
        return
    for field in ("r", "alpha", "target_modules", "quantize"):
        if getattr(saved, field) != getattr(current, field):
            raise ValueError(
                f"{path}: saved LoRAConfig.{field}={getattr(saved, field)!r} but the model "
                f"was injected with {field}={getattr(current, field)!r}"
            )

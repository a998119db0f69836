"""ContinualLoRA under DDP and FSDP2: whole views of sharded adapters, writes back into the shards, and a
check that every rank runs each task boundary.

Under FSDP2 (``fully_shard``) the adapters are ``DTensor`` parameters sharded across ranks while
the merged adapter, a buffer, stays a plain tensor replicated on every rank. A task boundary works
on whole matrices (the QR of A, the merge of B): ``full`` gathers a parameter (a collective: every
rank calls it), the math runs identically on every rank, and ``assign_`` writes the result back
into each rank's shard (no communication). Under DDP the parameters are whole replicas already.

A boundary that one rank skips would leave the replicas silently different; ``check_ranks`` makes
every rank show the others which operation it is at (one tiny all-gather) and raises on all of
them when they disagree. Without an initialised process group (or with one rank) all of this is a
no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["assign_", "check_ranks", "full", "is_dtensor", "is_writer", "world_size"]

_OPS = {"begin_task": 1, "end_task": 2, "save": 3, "load": 4}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return world_size() == 1 or dist.get_rank() == 0


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from its shards for a DTensor: every rank must call this)."""
    return t.full_tensor() if is_dtensor(t) else t


def assign_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a whole ``src``; a sharded ``dst`` takes its own slice of it, locally."""
    if is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def check_ranks(op: str, task_index: int, in_task: bool, device: torch.device) -> None:
    """Raise on every rank unless all ranks are at the same ``op`` with the same SLAO state.

    Raises:
        RuntimeError: naming each rank's operation and state.
    """
    n = world_size()
    if n == 1:
        return
    if device.type != "cuda" and dist.get_backend() == "nccl":  # NCCL gathers CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([_OPS[op], task_index, int(in_task)], dtype=torch.int64, device=device)
    seen = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(seen, mine)
    states = [tuple(t.tolist()) for t in seen]
    if len(set(states)) > 1:
        names = {v: k for k, v in _OPS.items()}
        desc = "; ".join(
            f"rank {r}: {names.get(s[0], '?')} at task_index {s[1]}" for r, s in enumerate(states)
        )
        raise RuntimeError(
            f"ContinualLoRA.{op}: the ranks disagree ({desc}); every rank must run each task boundary, "
            "save and load"
        )

"""Batched time-aware merge (SLAO step 3): every layer's ``B_m ← B_m + λ (B_ft − B_m)`` in one launch.

The layers' B matrices have different shapes and live in separate allocations. Rather than
concatenating them (a copy in, a copy out: three times the traffic of the merge itself), the
launcher hands the kernel two tables of raw addresses (``m_ptrs``, ``f_ptrs``) and the element
count of every tensor, and splits the whole model's work into ``BLOCK``-element chunks: chunk
``c`` knows its tensor ``tensor_of[c]`` and its position ``chunk_of[c]`` in it. One program per
chunk, so a 14336×64 B and a 1024×8 B are balanced alike and no program idles (the grouped-GEMM
pattern of Triton's tutorial 08). Arithmetic is fp32 whatever the storage dtype, in ``torch.lerp``'s
form (``B_ft − (1 − λ)(B_ft − B_m)`` for λ ≥ 0.5) like the torch path; λ is a runtime argument, so a
new task never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mbf.kernels._common import TL_DTYPES, device_of

__all__ = ["time_aware_merge_"]

BLOCK = 2048  # elements per program: 8 KiB of fp32 in flight per tensor, enough to saturate HBM


@triton.jit
def _merge_kernel(
    m_ptrs,  # (T,) int64 addresses of the merged Bs (updated in place)
    f_ptrs,  # (T,) int64 addresses of the fine-tuned Bs
    numel_ptr,  # (T,) int64 elements of each tensor
    tensor_of_ptr,  # (C,) int32 tensor handled by each chunk
    chunk_of_ptr,  # (C,) int32 index of each chunk inside its tensor
    lam,  # fp32 λ of the task just finished
    M_DTYPE: tl.constexpr,  # storage dtype of the merged Bs
    F_DTYPE: tl.constexpr,  # storage dtype of the fine-tuned Bs
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(tensor_of_ptr + c)
    offs = tl.load(chunk_of_ptr + c).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(numel_ptr + t)
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(M_DTYPE))
    f_ptr = tl.load(f_ptrs + t).to(tl.pointer_type(F_DTYPE))
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask).to(tl.float32)
    diff = f - m
    # torch.lerp's two-sided form: exact at both ends, so λ = 1 (task 1) gives B_m = B_ft bit for bit
    out = tl.where(lam < 0.5, m + lam * diff, f - (1.0 - lam) * diff)
    tl.store(m_ptr + offs, out.to(M_DTYPE), mask=mask)


def time_aware_merge_(merged: Sequence[torch.Tensor], ft: Sequence[torch.Tensor], lam: float) -> None:
    """In place ``merged[i] ← merged[i] + lam (ft[i] − merged[i])`` for all i, one launch per dtype pair.

    Args:
        merged: contiguous fp32/fp16/bf16 tensors on one device (updated in place).
        ft: tensors of the same shapes, contiguous, on the same device.
        lam: λ.

    Raises:
        ValueError: on mismatched lengths, shapes or devices, a non-contiguous tensor or another dtype.
    """
    if len(merged) != len(ft):
        raise ValueError(f"{len(merged)} merged tensors but {len(ft)} fine-tuned ones")
    groups: dict[tuple, list[int]] = {}
    for i, (m, f) in enumerate(zip(merged, ft)):
        if m.shape != f.shape or m.device != f.device or m.device != merged[0].device:
            raise ValueError(
                f"tensor {i}: merged {tuple(m.shape)} {m.device}, fine-tuned {tuple(f.shape)} {f.device}"
            )
        if not (m.is_contiguous() and f.is_contiguous()):
            raise ValueError(f"tensor {i}: the batched merge needs contiguous tensors")
        if m.dtype not in TL_DTYPES or f.dtype not in TL_DTYPES:
            raise ValueError(f"tensor {i}: dtypes {m.dtype}, {f.dtype} must be one of {list(TL_DTYPES)}")
        if m.numel():
            groups.setdefault((m.dtype, f.dtype), []).append(i)
    for (m_dtype, f_dtype), idx in groups.items():
        table, maps = _chunk_table(
            tuple(merged[i].data_ptr() for i in idx),
            tuple(ft[i].data_ptr() for i in idx),
            tuple(merged[i].numel() for i in idx),
            merged[idx[0]].device,
        )
        with device_of(table):
            _merge_kernel[(maps.shape[1],)](
                m_ptrs=table[0], f_ptrs=table[1], numel_ptr=table[2], tensor_of_ptr=maps[0],
                chunk_of_ptr=maps[1], lam=float(lam), M_DTYPE=TL_DTYPES[m_dtype], F_DTYPE=TL_DTYPES[f_dtype],
                BLOCK=BLOCK, num_warps=4,
            )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _chunk_table(
    m_ptrs: tuple[int, ...], f_ptrs: tuple[int, ...], sizes: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, T)`` int64 addresses and sizes, ``(2, C)`` int32 chunk -> (tensor, chunk in tensor), on device.

    A pure function of its arguments, memoised: ContinualLoRA merges the same buffers at every task
    boundary, so after the first one the merge is a single launch with no host-to-device copy.
    """
    chunks = torch.tensor([triton.cdiv(n, BLOCK) for n in sizes])
    tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), chunks)
    first = torch.cumsum(chunks, 0) - chunks  # index of each tensor's first chunk
    chunk_of = torch.arange(len(tensor_of)) - torch.repeat_interleave(first, chunks)
    table = torch.tensor([m_ptrs, f_ptrs, sizes], dtype=torch.int64).to(device)
    return table, torch.stack([tensor_of, chunk_of]).to(torch.int32).to(device)

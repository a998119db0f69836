"""The route of the LoRA op: which path runs a call, decided here and nowhere else (no triton here).

Every caller reads it: ``mbf.functional.lora_linear`` runs the path ``route`` returns; the dispatcher
(``mbf.functional.dispatch``) measures the paths ``candidates`` names; the fused op's launcher
(``mbf.kernels.lora_op``) and the hybrid path's low-rank kernels sum dA and dB where
``atomic_grads`` and ``da_apart`` say.

``backend="auto"`` is resolved first: where the dispatcher measured a choice (``measures``: CUDA
tensors, or CPU ones under the harness dispatcher; not over NF4 with an explicit ``nf4_path``) the
choice is the backend (over NF4 a choice other than ``torch`` is ``triton`` with ``nf4_path`` = the
choice); unmeasured, ``triton`` for CUDA tensors and ``torch`` for CPU ones (``unmeasured``). Then,
with ``max`` = ``MAX_RANK``, the first row that matches decides::

    backend  base   rank   M      trains  path         low-rank  dA
    -------  -----  -----  -----  ------  -----------  --------  --------
    any      any    any    any    yes     autograd     torch     autograd
    torch    dense  any    any    no      torch        torch     torch
    triton   dense  <=max  any    no      fused        fused     fused
    triton   dense  >max   any    no      torch        torch     torch
    hybrid   dense  <=max  any    no      hybrid       triton    apart
    hybrid   dense  >max   any    no      torch        torch     torch
    torch    nf4    any    any    no      nf4-torch    torch     torch
    triton   nf4    any    <=16   no      nf4-fused    torch     torch
    triton   nf4    any    >16    no      nf4-dequant  torch     torch
    hybrid   nf4    <=max  <=16   no      nf4-fused    triton    apart
    hybrid   nf4    <=max  >16    no      nf4-dequant  triton    apart
    hybrid   nf4    >max   <=16   no      nf4-fused    torch     torch
    hybrid   nf4    >max   >16    no      nf4-dequant  torch     torch

- trains: W0, the bias or the merged B requires grad (``trainable_base``).
- path: ``autograd`` (the same algebra under plain autograd, gradients to the base too), ``torch``
  (``LoRALinearFunction`` over a dense W0 by torch GEMMs), ``fused`` (the fused Triton op,
  ``mbf.kernels.lora_op``), ``hybrid`` (the Function over a dense W0 in cuBLAS), ``nf4-torch`` /
  ``nf4-dequant`` / ``nf4-fused`` (the Function over NF4: dequantised by torch, by one Triton pass
  feeding cuBLAS, or tile by tile inside the Triton GEMM). An explicit ``nf4_path`` replaces the M
  rule (``FUSED_MAX_M`` = 16 tokens: ``nf4_path_of``).
- low-rank: who computes S, dS with dB, and dA: torch GEMMs, the Triton low-rank kernels
  (``mbf.kernels.lora_lowrank``) or the fused op itself. They share the fused kernels' rank limit.
- dA: ``torch`` (a torch GEMM), ``apart`` (a Triton pass of its own over x and dS), ``fused`` (the
  fused op's: fp32 atomics in the dX GEMM's prologue, or in a launch of its own where ``da_apart``
  says; the fixed-order pass where ``atomic_grads`` says no), ``autograd``.

Dropout changes no row: every path draws the same Philox mask. It enters ``da_apart`` only through
the tile budgets (the mask caps dX's tile as the prologue does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "FUSED_MAX_M",
    "FUSE_MAX_R_PAD",
    "MAX_RANK",
    "NF4_PATHS",
    "PATHS",
    "Route",
    "atomic_grads",
    "candidates",
    "da_apart",
    "fused_rank",
    "measures",
    "nf4_path_of",
    "route",
    "unmeasured",
]

# The rank limit of the fused kernels and of the hybrid path's low-rank kernels: one (BLOCK, R_PAD)
# register tile; at R_PAD 128 every kernel spills on sm_90. Above it the torch path runs.
MAX_RANK = 64
# Tokens per call up to which an NF4 base is read by the fused kernel; above it, one dequant pass +
# cuBLAS. UNMEASURED: no GPU has timed either path yet. 16 is a conservative guess at decode-sized
# batches, where bitsandbytes and Unsloth also fuse: small M, where the GEMM is bound by reading W and
# 0.52 bytes per weight beat 2, while the fused kernel dequantises each W tile once per M-tile. To set
# it, run bench/test_bench_nf4.py on the target GPU (it times both paths over M) and put the crossover
# here.
FUSED_MAX_M = 16
# dA and dB join the dY and dX passes as fp32 atomics up to this padded rank; beyond it their
# (BLOCK, R_PAD) tiles crowd those kernels (spills at R_PAD 64), and the wgrad kernel sums them in a
# pass of its own over x and dY (in a fixed order: deterministic as well).
FUSE_MAX_R_PAD = 32

PATHS = ("autograd", "torch", "fused", "hybrid", "nf4-torch", "nf4-dequant", "nf4-fused")
NF4_PATHS = ("torch", "fused", "dequant")  # an NF4 base's paths: by torch, or the Triton nf4_path


class Route(NamedTuple):
    """One call's route (a row of the module's table)."""

    path: str  # one of PATHS
    backend: str  # the resolved backend, "torch", "triton" or "hybrid": the device it needs
    lowrank: str  # S, dS with dB, dA: "torch", "triton" (the low-rank kernels) or "fused" (the op)
    da: str  # "torch", "apart", "fused" or "autograd"
    max_rank: int  # the rank limit the route was decided under


def fused_rank(r: int) -> bool:
    """Whether rank r fits the fused kernels (and the hybrid path's low-rank kernels)."""
    return 1 <= r <= MAX_RANK


def nf4_path_of(M: int) -> str:
    """``"fused"`` or ``"dequant"``: the NF4 base's Triton path for a GEMM of M tokens."""
    return "fused" if M <= FUSED_MAX_M else "dequant"


def unmeasured(cuda: bool) -> str:
    """``auto`` where nothing is measured: the Triton kernels for CUDA tensors, torch for CPU ones."""
    return "triton" if cuda else "torch"


def measures(backend: str, base: str, nf4_path: str, dispatches: bool) -> bool:
    """Whether a call asks the dispatcher: ``auto`` where it dispatches (``dispatch.dispatches(x)``),
    except over NF4 with its path named."""
    return backend == "auto" and dispatches and not (base == "nf4" and nf4_path != "auto")


def candidates(base: str, r: int, triton_runs: bool) -> tuple[str, ...]:
    """What the dispatcher measures for a case: ``lora_linear`` backends over a dense W0, NF4 paths
    over an NF4 one (torch first: the reference the others must beat). ``triton_runs``: on CUDA, or on
    the CPU under the interpreter."""
    if base == "nf4":
        return ("torch", *(NF4_PATHS[1:] if triton_runs else ()))
    return ("torch", *(("triton", "hybrid") if triton_runs and fused_rank(r) else ()))


def route(
    *,
    backend: str,
    base: str,
    rank: int,
    M: int,
    cuda: bool,
    choice: str | None = None,
    nf4_path: str = "auto",
    trainable_base: bool = False,
) -> Route:
    """The route of one call (the module's table).

    Args:
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"hybrid"`` (checked by the caller).
        base: ``"dense"`` or ``"nf4"``. rank: r. M: tokens. cuda: x is on a CUDA device.
        choice: the dispatcher's measured choice (``backend="auto"`` only), None: not measured.
        nf4_path: ``"auto"`` (the M rule) or the NF4 path to run with Triton.
        trainable_base: W0 (dense), the bias or the merged B requires grad.

    Raises:
        ValueError: on an unknown ``nf4_path`` where it is used.
    """
    if backend == "auto":
        if choice is None:
            backend = unmeasured(cuda)
        elif base == "nf4" and choice != "torch":
            backend, nf4_path = "triton", choice
        else:
            backend = choice
    if trainable_base:
        return Route("autograd", backend, "torch", "autograd", MAX_RANK)
    fits = fused_rank(rank)
    low = "triton" if backend == "hybrid" and fits else "torch"
    da = "apart" if low == "triton" else "torch"
    if base == "nf4":
        if backend == "torch":
            nf4_path = "torch"
        elif nf4_path == "auto":
            nf4_path = nf4_path_of(M)
        if nf4_path not in NF4_PATHS:
            raise ValueError(f"path {nf4_path!r} must be one of auto, {', '.join(NF4_PATHS)}")
        return Route(f"nf4-{nf4_path}", backend, low, da, MAX_RANK)
    if backend == "triton" and fits:
        return Route("fused", backend, "fused", "fused", MAX_RANK)
    return Route("hybrid" if low == "triton" else "torch", backend, low, da, MAX_RANK)


def atomic_grads(r_pad: int) -> bool:
    """Whether dA and dB are summed by fp32 atomics inside the dY and dX passes (any order), rather
    than by the fixed-order wgrad kernel: up to ``FUSE_MAX_R_PAD``, outside deterministic mode."""
    return r_pad <= FUSE_MAX_R_PAD and not torch.are_deterministic_algorithms_enabled()


def da_apart(M: int, K: int, budget_alone: int, budget_with_da: int, sms: int) -> bool:
    """Whether the fused op's dA leaves the dX GEMM's prologue for a launch of its own (one more pass
    over x and dS): where the prologue caps dX's tile (``budget_*``: fp32 accumulator elements per
    thread dX's tile may hold without and with it, ``lora_configs.linear_budget``; the dropout mask
    caps both alike) and dX's ``(M, K)`` output, in tiles of the wider size on 8 warps, still fills
    the GPU's ``sms``."""
    return budget_alone > budget_with_da and -(-M * K // (budget_alone * 256)) >= sms

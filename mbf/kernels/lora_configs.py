"""Autotune candidates of the fused LoRA kernels (``lora.py``): one table per kernel and element size.

Every candidate is compiled for sm_90 and sm_80 by ``tools/compile_check.py`` (the test suite
runs it on CPU): each fits both targets' shared memory (232,448 / 166,912 bytes per block) and none
spills more than a few bytes. fp32 operands need twice the shared memory per stage, so their tiles
take half the BLOCK_K; 128-row tiles use 8 warps (with 4, a 128×128 fp32 accumulator spills ~42 KB).
The tables are starting points, not measurements: ``bench/test_bench_lora.py`` is where a GPU
checks them. Pruning keeps, for an M bucket ``m`` (next power of two of M), the tiles with
``min(64, max(16, m/4)) <= BLOCK_M <= max(16, m)``: never taller than the input, never so short at
large M that W is re-read hundreds of times, and at least three candidates in every bucket.

Splits (``split_count``): ``down`` and ``dy`` reduce over K and N with one row tile per program, so at
small M they would launch a few dozen programs on a GPU of 132 SMs. The launcher gives each row tile's
reduction to several programs (the grid's second axis), each summing whole BLOCK steps into a part of
its own; the parts are added in a fixed order afterwards (deterministic, no atomics on S or dS).

Pinned configs: under ``torch.use_deterministic_algorithms(True)`` or ``MBF_PIN_CONFIGS=1`` the
launcher runs the first candidate that survives pruning, without timing anything: results are the
same bits in every process, and a correctness run compiles one config per kernel, not all of them.
"""

from __future__ import annotations

import torch
import triton

from mbf.kernels._common import configs_pinned, interpreting

__all__ = [
    "CANDIDATES",
    "SM_COUNT",
    "autotune",
    "launch",
    "linear_budget",
    "m_range",
    "sm_count",
    "split_count",
    "wgrad_config",
]

# One small config per kernel under TRITON_INTERPRET=1: the interpreter runs every program in
# numpy, so autotuning there only costs time; these blocks are small enough that the tests' odd
# shapes still span several tiles and exercise every edge mask.
_INTERPRET_CONFIGS = {
    "down": triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
    "linear": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}),
    "dy": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
    "wgrad": triton.Config({"BLOCK_M": 16, "BLOCK_C": 16}),
}

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per element size of the GEMM operands, tallest first
# (the first fit is the pinned config). 16-bit: the Triton matmul tutorial's Hopper tiles.
_LINEAR = {
    2: [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 128, 4, 4),
    ],
    4: [
        (128, 128, 32, 8, 3),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (32, 128, 32, 4, 4),
        (16, 128, 64, 4, 3),
        (16, 64, 64, 4, 4),
    ],
}
# down: (BLOCK_M, BLOCK_K, warps, stages), memory-bound over x: enough rows to stream K (its share of K)
_DOWN = {
    2: [(128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4), (16, 256, 4, 3), (16, 128, 4, 4)],
    4: [(128, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 32, 4, 4), (16, 128, 4, 3), (16, 64, 4, 4),
        (16, 32, 4, 4)],
}
# dy: (BLOCK_M, BLOCK_N, warps, stages), memory-bound over dY: each program sweeps its share of N
_DY = {
    2: [(128, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 4)],
    # (32, 32) and (16, 16): fp32 tf32x3 with dB at R_PAD 32, where BLOCK_N 64 spills on sm_80
    4: [(128, 32, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 32, 4, 4), (16, 64, 4, 4), (16, 32, 4, 3),
        (16, 16, 4, 3)],
}


# The split of down's and dy's reductions (``split_count``).
SM_COUNT = 132  # SMs planned for off a GPU (the interpreter, the compile check): an H100 / H200 SXM
WAVES = 2  # programs per SM aimed for: a memory-bound pass with one program per SM leaves HBM idle
MIN_STEPS = 2  # BLOCK steps per program at least (GPU): fewer and each part is mostly prologue


def sm_count(t: torch.Tensor) -> int:
    """The SMs of ``t``'s GPU, or ``SM_COUNT`` for a CPU tensor."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return SM_COUNT


def split_count(tuner, rows: int, length: int, block: str, sms: int, kwargs: dict) -> int:
    """Programs per row tile sharing its reduction over ``length`` (columns of ``block`` per step).

    Enough that row tiles x splits reaches ``WAVES`` x ``sms`` programs, none with fewer than
    ``MIN_STEPS`` steps (one under the interpreter, so that small test shapes split too), and the
    steps dealt so that no program is left without one. Decided from the tallest row tile the
    pruner keeps for this launch (the pinned config; any other candidate has more row tiles): the
    split, and so the parts' buffer, are known before the autotuner picks a config.
    """
    first = tuner.early_config_prune(tuner.configs, {}, **kwargs)[0]
    tiles, steps = triton.cdiv(rows, first.kwargs["BLOCK_M"]), triton.cdiv(length, first.kwargs[block])
    most = max(1, steps // (1 if interpreting() else MIN_STEPS))
    split = max(1, min(triton.cdiv(WAVES * sms, tiles), most))
    return triton.cdiv(steps, triton.cdiv(steps, split))


def _table(kernel: str, size: int) -> list[triton.Config]:
    if kernel == "linear":
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _LINEAR[size]
        ]
    name = "BLOCK_K" if kernel == "down" else "BLOCK_N"
    rows = _DOWN[size] if kernel == "down" else _DY[size]
    return [triton.Config({"BLOCK_M": bm, name: b}, num_warps=w, num_stages=s) for bm, b, w, s in rows]


# the candidates of every kernel per element size of its main (streamed) operand
CANDIDATES = {kernel: {size: _table(kernel, size) for size in (2, 4)} for kernel in ("down", "linear", "dy")}
# the operands whose widest element picks the table: down and dy convert their streamed tile to the
# adapter's dtype before the dot (fp32 adapters: fp32 tiles); linear's big dot is the base GEMM's
_SIZED_BY = {"down": ("x_ptr", "a_ptr"), "linear": ("lhs_ptr",), "dy": ("dy_ptr", "b_ptr")}


def m_range(m_bucket: int) -> tuple[int, int]:
    """``(lowest, highest)`` BLOCK_M worth trying for an M bucket (see the module docstring)."""
    hi = max(16, m_bucket)
    return min(64, max(16, hi // 4)), hi


def _per_thread(config: triton.Config, width: str) -> float:
    """Elements of the config's (BLOCK_M, width) tile per thread: what its fp32 accumulator costs."""
    return config.kwargs["BLOCK_M"] * config.kwargs[width] / (32 * config.num_warps)


def _split(args: dict, main: str, lora: str) -> bool:
    """Whether this launch's fp32 products are split into TF32 parts in registers: fp32 tiles under
    tf32x3, or fp32 LoRA tiles beside fp16 ones (two TF32 passes). Those double the tiles held."""
    a, b = args[main].dtype, args[lora].dtype
    fp32 = a == b == torch.float32 and args["PRECISION"] == "tf32x3"
    return fp32 or {a, b} == {torch.float16, torch.float32}


def _fits(kernel: str, config: triton.Config, args: dict) -> bool:
    """Whether ``config``'s tiles fit the registers of this launch's variant: what the compile check
    measured on sm_90 with ptxas (more than 64 bytes of spills is a misfit).

    linear: ``linear_budget``, and no 128-row tile for dX + dA with fp32 adapters over a 16-bit base
    (it spills under Triton 3.6). Split, dy with dB keeps BLOCK_M x max(R_PAD, 32) <= 1024 (and BLOCK_N
    <= 32 at R_PAD 32) and down at R_PAD 64 BLOCK_M x BLOCK_K <= 1024.
    """
    R, c = args["R_PAD"], config.kwargs
    if kernel == "linear" and c["BLOCK_M"] > 64 and _dx_and_da(args) and _mixed(args):
        # dX + dA with fp32 adapters over a 16-bit base: the 128 x 128 tile on 8 warps holds as many
        # accumulator elements per thread (64) as 64 x 128 on 4, so linear_budget lets it through, but
        # it used 255 registers and spilled 16 B on sm_90 under Triton 3.6, the GPU image's (with
        # dropout; 0 under 3.9), and 896-1,196 B on sm_80 under 3.6 and 3.9; 64 x 128 spills nothing
        # (198 registers on sm_90 under 3.6)
        return False
    if kernel == "down":
        return not (_split(args, "x_ptr", "a_ptr") and R >= 64 and c["BLOCK_M"] * c["BLOCK_K"] > 1024)
    if kernel == "dy":
        # BLOCK_M x max(R_PAD, 32) <= 1024: at R_PAD 16 the 64-row tile spilled 120 B under Triton 3.6;
        # at R_PAD 32 BLOCK_N 64 spills 68-72 B on sm_80 (16 and 32 rows, Triton 3.9)
        tight = _split(args, "dy_ptr", "b_ptr") and args["ACC_DB"]
        tall = c["BLOCK_M"] * max(R, 32) > 1024 or (R >= 32 and c["BLOCK_N"] > 32)
        # BLOCK_N 16 only where 64 spills (elsewhere the 16 x 16 tile spills 8-16 B on sm_90)
        return not (tight and tall) and (c["BLOCK_N"] >= 32 or (tight and R >= 32))
    return _per_thread(config, "BLOCK_N") <= linear_budget(args)


def _dx_and_da(args: dict) -> bool:
    """Whether a linear launch is the dX GEMM with the dA prologue (HAS_MAIN False: the prologue alone)."""
    return bool(args.get("HAS_MAIN", True) and args["ACC_DA"])


def _mixed(args: dict) -> bool:
    """Whether the linear kernel's LoRA tiles are wider than its base GEMM's (fp32 adapters, 16-bit base)."""
    return args["up_ptr"].dtype != args["lhs_ptr"].dtype


def linear_budget(args: dict) -> int:
    """fp32 accumulator elements per thread the linear kernel's variant ``args`` may hold (``_fits``).

    The plain GEMM: 128 (the tutorial's 128×256 tile on 8 warps), 64 at R_PAD 64. The dA prologue or
    the dropout mask also hold the x tile and the mask: 64, and 32 with fp32 LoRA tiles above R_PAD
    16 (at 128×256, R_PAD 16: the prologue spills 56-100 B on sm_90 with fp32 adapters over a 16-bit
    base and 48-72 B on sm_80 with 16-bit ones; dX alone with the mask 100 B at fp16, Triton 3.9 /
    3.6). Split fp32 products (``_split``) quarter these.
    """
    R, mixed = args["R_PAD"], _mixed(args)
    if args["ACC_DA"] or args["HAS_DROPOUT"]:
        budget = 64 if R <= (16 if mixed else 32) else 32
    else:
        budget = 128 if R <= 32 else 64
    return max(16, budget // 4) if _split(args, "lhs_ptr", "up_ptr") else budget


def _pruner(kernel: str):
    """early_config_prune: the interpreter's one config, else the dtype's table cut to the variant's
    register budget and to M's bucket (the two tallest that fit when the budget rules M's out)."""

    def prune(configs, nargs, **kwargs):
        if interpreting():
            return [_INTERPRET_CONFIGS[kernel]]
        args = {**nargs, **kwargs}
        table = CANDIDATES[kernel][max(args[name].element_size() for name in _SIZED_BY[kernel])]
        table = [c for c in table if _fits(kernel, c, args)]
        lo, hi = m_range(args["m_bucket"])
        kept = [c for c in table if lo <= c.kwargs["BLOCK_M"] <= hi]
        return kept if len(kept) >= 2 else [c for c in table if c.kwargs["BLOCK_M"] <= hi][:2]

    return prune


def _tune_bench(fn, quantiles):
    # a short timing per candidate: tuning runs once per key, and a few configs per kernel suffice
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotune(kernel: str, key: list[str], reset: list[str] | None = None):
    """``triton.autotune`` over every candidate of ``kernel``; the pruner picks the dtype's table."""
    every = [c for size in (2, 4) for c in CANDIDATES[kernel][size]]
    return triton.autotune(
        every,
        key=key,
        reset_to_zero=reset,
        do_bench=_tune_bench,
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )


def launch(tuner, grid, **kwargs) -> None:
    """``tuner[grid](**kwargs)``, or its first pruned candidate alone when configs are pinned."""
    if configs_pinned():
        config = tuner.early_config_prune(tuner.configs, {}, **kwargs)[0]
        tuner.fn[grid](**kwargs, **config.all_kwargs())
    else:
        tuner[grid](**kwargs)


def wgrad_config(element_size: int) -> dict:
    """The deterministic dA / dB kernel's one config (it only runs pinned): BLOCK_C 32 keeps K/32
    programs busy (128 at K = 4096) while each streams all of M."""
    if interpreting():
        return dict(_INTERPRET_CONFIGS["wgrad"].all_kwargs())
    return dict(BLOCK_M=128 if element_size == 2 else 64, BLOCK_C=32, num_warps=4, num_stages=3)

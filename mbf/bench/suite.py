"""``mbf bench``: the training-step and task-boundary set that fits this machine, written as measured.

On CUDA: Llama-3-8B and Llama-2-7B (4 layers) and SmolLM2-135M, 512 and 2048 tokens, batch 1 and 4,
with and without activation checkpointing, every provider. On CPU (or ``--quick``): SmolLM2-135M,
batch 4 × 128 tokens, r = 16 on q_proj and v_proj (the ``mbf`` command's adapter), the end-to-end
floor, PEFT and mbf, in float32 and in each 16-bit dtype ``auto``'s probe timed (``bench_dtypes``: the
whole step checks the probe's pick, and the run says when they disagree); each dtype's providers step
in turn in one process (their ratios hold on a loaded machine), then each runs alone once for its
peak memory.
``--qlora``: the low-VRAM evidence instead (``qlora_suite``): the QLoRA step on the embedded model's
real weights against PEFT + bitsandbytes and the dense bf16 step, each row with the bytes of weights,
adapters, optimizer state and activations (``train_step.memory_bytes``). It never asserts a speed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from mbf.bench import boundary, train_step
from mbf.bench.plot import plot_file
from mbf.bench.rows import FLOOR, RowWriter, device_name, make_row
from mbf.bench.train_step import PROVIDERS, StepConfig

__all__ = ["collect", "bench_dtypes", "default_suite", "dtype_summary", "main", "qlora_suite"]

REFERENCES = {"train_step": (FLOOR, train_step.BASELINE), "task_boundary": boundary.BASELINE}
CPU_ROUNDS = 8  # timed steps of each CPU configuration, interleaved with the others' (after one warm-up)


def bench_dtypes(dtype: str, cuda: bool) -> tuple[str, ...]:
    """The base dtypes ``--dtype`` measures. ``auto`` on CPU: float32 and each 16-bit dtype that
    ``auto``'s probe (``mbf.experiment.cpu_dtype``, the SmolLM2 linears, cached) timed to the end,
    whichever it picked, so the whole step checks its pick; not one it dropped as several times slower
    (emulated: minutes a step). On CUDA: what ``auto_dtype`` picks (not measured there)."""
    from mbf.experiment import cpu_dtype
    from mbf.experiment.models import auto_dtype

    if dtype != "auto":
        return (dtype,)
    if cuda:
        return (str(auto_dtype("cuda")).removeprefix("torch."),)
    measured = cpu_dtype.cpu_dtype().ms
    return tuple(d for d in cpu_dtype.CANDIDATES if d == "float32" or d in measured)


def dtype_summary(rows: list[dict], choice) -> list[str]:
    """Lines comparing the whole training step across dtypes (mbf's rows) with ``auto``'s pick
    (``choice``: a ``cpu_dtype.DtypeChoice``), and a note when the step disagrees with the probe."""
    from mbf.experiment.cpu_dtype import MARGIN, pick

    step = {r["dtype"]: r["ms"] for r in rows if r.get("op") == "train_step" and r["provider"] == "mbf"}
    if len(step) < 2 or "float32" not in step:
        return []
    times = ", ".join(f"{d} {ms:,.0f} ms" for d, ms in step.items())
    lines = [f"training step (mbf): {times}; --dtype auto chose {choice.name} (from the linears' probe)"]
    faster = pick(step)
    if faster != choice.name and step[choice.name] > step[faster] * (1.0 + MARGIN):
        lines.append(
            f"mbf: note: the whole step is faster in {faster} than in auto's {choice.name} on this CPU: the "
            f"probe of the linears and the step disagree; pin --dtype {faster} (and please report it)"
        )
    return lines


def default_suite(cuda: bool, dtypes: tuple[str, ...] = ("float32",)) -> list[StepConfig]:
    """The full GPU set on CUDA; the CPU set (SmolLM2, batch 4 × 128, r 16 on q/v) otherwise."""
    if not cuda:
        base = StepConfig(
            model="smollm2-135m", seq=128, batch=4, targets="q_proj,v_proj", warmup=1, steps=3, device="cpu"
        )
        return [replace(base, dtype=d, provider=p) for d in dtypes for p in (FLOOR, "peft", "mbf")]
    return [
        StepConfig(
            model=model, layers=layers, provider=p, seq=seq, batch=batch, checkpointing=ckpt, dtype=dtype
        )
        for dtype in dtypes
        for model, layers in (("llama-3-8b", 4), ("llama-2-7b", 4), ("smollm2-135m", None))
        for seq in (512, 2048)
        for batch in (1, 4)
        for ckpt in (False, True)
        for p in PROVIDERS
    ]


def qlora_suite(cuda: bool) -> list[StepConfig]:
    """The low-VRAM set: the QLoRA step (NF4 base, every projection adapted, r 16) on the embedded
    SmolLM2-135M's real weights, batch 4 × 128, against PEFT + bitsandbytes and the dense step, in
    bf16 on CUDA and on a CPU in the dtype ``auto`` picks there (a CPU without fast bf16 emulates its
    matrix products: a full-model bf16 step takes many minutes there)."""
    from mbf.experiment.models import auto_dtype

    dtype = "bfloat16" if cuda else str(auto_dtype("cpu")).removeprefix("torch.")
    base = StepConfig(
        model=train_step.EMBEDDED, seq=128, batch=4, dtype=dtype, warmup=1, steps=3,
        device="cuda" if cuda else "cpu",
    )  # fmt: skip
    configs = [replace(base, provider=p) for p in ("peft-bnb4", "mbf-nf4", "peft", "mbf")]
    if dtype != "bfloat16":  # the dense bf16 step too: one step, alone (emulated here, minutes long)
        configs.append(replace(base, provider="mbf", dtype="bfloat16", warmup=0, steps=1))
    return configs


def _cpu_rows(configs: list[StepConfig], rounds: int) -> list[dict]:
    """Each dtype's configurations interleaved step by step in one process (the time), then each one
    alone in a fresh process for one step (its peak RSS). Rows in ``configs`` order."""
    from tqdm import tqdm

    rows = {}
    once = [cfg for cfg in configs if (cfg.warmup, cfg.steps) == (0, 1)]  # one step, alone (its time too)
    for dtype in dict.fromkeys(cfg.dtype for cfg in configs if cfg not in once):
        group = [cfg for cfg in configs if cfg.dtype == dtype and cfg not in once]
        tqdm.write(f"train steps in {dtype}: {', '.join(c.provider for c in group)}, {rounds} rounds")
        rows.update(zip(group, train_step.measure_interleaved(group, rounds)))
    for cfg in tqdm(configs, desc="peak memory", unit="config"):
        if cfg in once:
            try:
                rows[cfg] = train_step.measure_step_isolated(cfg)
            except RuntimeError as err:
                tqdm.write(f"no single step for {cfg.provider} {cfg.dtype}: {str(err).splitlines()[-1]}")
            continue
        try:
            alone = train_step.measure_step_isolated(replace(cfg, warmup=1, steps=1))
            rows[cfg]["peak_mem_bytes"] = alone["peak_mem_bytes"]
            rows[cfg].update({k: alone[k] for k in train_step.MEMORY_KEYS if k in alone})
            rows[cfg]["extra_keys"] = list(dict.fromkeys([*rows[cfg]["extra_keys"], *train_step.MEMORY_KEYS]))
        except RuntimeError as err:
            tqdm.write(f"no peak memory for {cfg.provider} {cfg.dtype}: {str(err).splitlines()[-1]}")
    return [rows[cfg] for cfg in configs if cfg in rows]


def _cross_dtype_ratio(rows: list[dict]) -> None:
    """``ratio_to_peft_float32`` on each 16-bit row: its ms over PEFT's on the float32 model (same run)."""
    peft32 = {r["shape"]: r for r in rows if r["provider"] == train_step.BASELINE and r["dtype"] == "float32"}
    for r in rows:
        ref = peft32.get(r["shape"])
        if r["dtype"] != "float32" and ref is not None and r["M"] == ref["M"]:
            r["ratio_to_peft_float32"] = r["ms"] / ref["ms"]
            r["extra_keys"] = [*r["extra_keys"], "ratio_to_peft_float32"]


def collect(
    writer: RowWriter, configs: list[StepConfig], boundary_cases: bool = True, cuda: bool = False
) -> None:
    """Measure every configuration (on CPU: a subprocess each, interleaved), then the task boundary.

    A configuration that fails (out of memory, a provider not installed) is reported and skipped.
    """
    from tqdm import tqdm

    device = device_name("cuda" if cuda else "cpu")
    if cuda:
        rows = []
        for cfg in tqdm(configs, desc="train steps", unit="config"):
            try:
                rows.append(train_step.measure_step(cfg))
            except (RuntimeError, NotImplementedError, ImportError) as err:
                torch.cuda.empty_cache()
                reason = str(err).splitlines()[-1]
                tqdm.write(f"skipped {cfg.provider} {cfg.model} seq={cfg.seq} batch={cfg.batch}: {reason}")
    else:
        rows = _cpu_rows(configs, CPU_ROUNDS)
    _cross_dtype_ratio(rows)
    for row in rows:
        writer.append(make_row(device=device, **row))
    if not boundary_cases:
        return
    models = ("llama-3-8b", "smollm2-135m") if cuda else ("smollm2-135m",)
    for model_name in tqdm(models, desc="task boundary", unit="model"):
        for row in boundary.measure_boundary(model_name, 16, "cuda" if cuda else "cpu"):
            writer.append(make_row(device=device, **row))


def main(argv: list[str] | None = None) -> int:
    """Run the set that fits this machine; write the rows as measured, then the plots."""
    parser = argparse.ArgumentParser(prog="mbf bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/<device>-<date>.json)"
    )
    parser.add_argument("--quick", action="store_true", help="the CPU set even on CUDA")
    parser.add_argument("--no-boundary", action="store_true", help="skip the task-boundary benchmark")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="the base dtype; auto: on CPU float32 and each 16-bit dtype auto's probe timed (it picks "
        "among them), on CUDA what auto picks",
    )
    parser.add_argument("--qlora", action="store_true",
                        help="the low-VRAM set instead: the QLoRA step on the embedded model vs PEFT + "
                             "bitsandbytes and the dense bf16 step, with bytes of weights, adapters, "
                             "optimizer state and activations")  # fmt: skip
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    if args.qlora:
        writer = RowWriter(args.out, {"train_step": "peft-bnb4"})
        collect(writer, qlora_suite(cuda), boundary_cases=False, cuda=cuda)
    else:
        writer = RowWriter(args.out, REFERENCES)
        choice = None
        if args.dtype == "auto" and not cuda:  # the probe's answer (measured now, or from its cache)
            from mbf.experiment.cpu_dtype import cpu_dtype

            choice = cpu_dtype(report=None)
            print(choice.line())
        configs = default_suite(cuda, bench_dtypes(args.dtype, cuda))
        collect(writer, configs, boundary_cases=not args.no_boundary, cuda=cuda)
    print(writer.summary())
    if not args.qlora and choice is not None:
        for line in dtype_summary(writer.rows, choice):
            print(line)
    if writer.path is not None:
        for png in plot_file(writer.path):
            print(f"plot: {png}")
    return 0

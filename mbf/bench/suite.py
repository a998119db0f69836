"""``mbf bench``: the training-step and task-boundary set that fits this machine, written as measured.

On CUDA: Llama-3-8B and Llama-2-7B (4 layers) and SmolLM2-135M, 512 and 2048 tokens, batch 1 and 4,
with and without activation checkpointing, every provider. On CPU (or ``--quick``): SmolLM2 in fp32,
256 tokens, mbf against PEFT, each configuration in its own process. It never asserts a speed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from mbf.bench import boundary, train_step
from mbf.bench.plot import plot_file
from mbf.bench.rows import RowWriter, device_name, make_row
from mbf.bench.train_step import PROVIDERS, StepConfig

__all__ = ["collect", "default_suite", "main"]

REFERENCES = {"train_step": train_step.BASELINE, "task_boundary": boundary.BASELINE}


def default_suite(cuda: bool) -> list[StepConfig]:
    """The full GPU set on CUDA; a quick CPU set (SmolLM2, fp32, short sequences) otherwise."""
    if not cuda:
        base = StepConfig(
            model="smollm2-135m", seq=256, batch=1, dtype="float32", warmup=1, steps=3, device="cpu"
        )
        return [replace(base, provider=p, checkpointing=c) for c in (False, True) for p in ("peft", "mbf")]
    return [
        StepConfig(model=model, layers=layers, provider=p, seq=seq, batch=batch, checkpointing=ckpt)
        for model, layers in (("llama-3-8b", 4), ("llama-2-7b", 4), ("smollm2-135m", None))
        for seq in (512, 2048)
        for batch in (1, 4)
        for ckpt in (False, True)
        for p in PROVIDERS
    ]


def collect(
    writer: RowWriter, configs: list[StepConfig], boundary_cases: bool = True, cuda: bool = False
) -> None:
    """Measure every configuration (a subprocess each on CPU), then the task-boundary cost.

    A configuration that fails (out of memory, a provider not installed) is reported and skipped.
    """
    from tqdm import tqdm

    device = device_name("cuda" if cuda else "cpu")
    for cfg in tqdm(configs, desc="train steps", unit="config"):
        try:
            row = train_step.measure_step(cfg) if cuda else train_step.measure_step_isolated(cfg)
        except (RuntimeError, NotImplementedError, ImportError) as err:
            if cuda:
                torch.cuda.empty_cache()
            reason = str(err).splitlines()[-1]
            tqdm.write(f"skipped {cfg.provider} {cfg.model} seq={cfg.seq} batch={cfg.batch}: {reason}")
            continue
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
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    writer = RowWriter(args.out, REFERENCES)
    collect(writer, default_suite(cuda), boundary_cases=not args.no_boundary, cuda=cuda)
    print(writer.summary())
    if writer.path is not None:
        for png in plot_file(writer.path):
            print(f"plot: {png}")
    return 0

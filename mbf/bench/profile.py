"""Where a training step spends its time, op by op: ``torch.profiler`` over the providers of
``mbf.bench.train_step``, side by side (self CPU ms per step, summed over calls).

Run: ``python -m mbf.bench.profile [--dtype bfloat16] [--providers floor,peft,mbf] [--steps 3]``.
Prints a markdown table of the ops that take the most time in any provider, and each provider's
difference to the first (the floor by default): what a LoRA step costs beyond the frozen model.
Profiling adds overhead per op: read the table for where the time goes, the benchmarks for how much.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from mbf.bench.train_step import StepConfig, build_model

__all__ = ["main", "profile_step", "table"]


def profile_step(cfg: StepConfig, steps: int = 3) -> dict[str, tuple[float, int]]:
    """``{op name: (self CPU ms per step, calls per step)}`` of ``cfg``'s training step (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    from mbf.bench.train_step import MODEL_CONFIGS

    model, params = build_model(cfg)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, MODEL_CONFIGS[cfg.model]["vocab_size"], (cfg.batch, cfg.seq))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        out[e.key] = (e.self_cpu_time_total / 1e3 / steps, e.count // steps)
    return out


def table(profiles: dict[str, dict[str, tuple[float, int]]], top: int = 25) -> str:
    """Markdown: the ``top`` ops by their largest self time in any provider, then the totals."""
    names = list(profiles)
    worst: dict[str, float] = defaultdict(float)
    for prof in profiles.values():
        for op, (ms, _) in prof.items():
            worst[op] = max(worst[op], ms)
    ops = sorted(worst, key=worst.get, reverse=True)[:top]
    first = names[0]
    head = " | ".join(f"{n} ms (calls)" for n in names)
    diffs = " | ".join(f"{n} − {first}" for n in names[1:])
    lines = [f"| op | {head} | {diffs} |", "|---" * (1 + 2 * len(names) - 1) + "|"]

    def cell(prof, op):
        ms, calls = prof.get(op, (0.0, 0))
        return f"{ms:.1f} ({calls})"

    def ms_of(prof, op):
        return prof.get(op, (0.0, 0))[0]

    for op in ops:
        cells = " | ".join(cell(profiles[n], op) for n in names)
        d = " | ".join(f"{ms_of(profiles[n], op) - ms_of(profiles[first], op):+.1f}" for n in names[1:])
        lines.append(f"| `{op}` | {cells} | {d} |")
    totals = {n: sum(ms for ms, _ in p.values()) for n, p in profiles.items()}
    cells = " | ".join(f"**{totals[n]:.0f}**" for n in names)
    d = " | ".join(f"**{totals[n] - totals[first]:+.0f}**" for n in names[1:])
    lines.append(f"| all ops (self time) | {cells} | {d} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbf.bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--providers", default="floor,peft,mbf")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    base = StepConfig(
        model="smollm2-135m", seq=args.seq, batch=args.batch, r=args.r, targets=args.targets,
        dtype=args.dtype, device="cpu",
    )  # fmt: skip
    profiles = {}
    for p in args.providers.split(","):
        torch.manual_seed(0)
        profiles[p] = profile_step(StepConfig(**{**base.__dict__, "provider": p}), args.steps)
    print(
        f"threads {torch.get_num_threads()}, {args.dtype}, batch {args.batch} x {args.seq}, r {args.r} on "
        f"{args.targets}; self CPU ms per step (calls per step)\n"
    )
    print(table(profiles, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

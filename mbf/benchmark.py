"""End-to-end training-step benchmark: tokens/s and peak memory of a full step, per provider.

A step is forward + backward + AdamW on a Llama decoder stack with random weights (Llama-3-8B,
Llama-2-7B configs, a few layers when memory demands — the count is recorded — and SmolLM2-135M).
Providers:

- ``mbf``: ``mbf.inject`` on the model in the compute dtype (Triton on CUDA, torch on CPU);
- ``mbf-nf4``: the same with ``LoRAConfig(quantize="nf4")`` (the QLoRA base of ``mbf.quant``);
- ``peft``: PEFT's LoRA on the same model;
- ``peft-bnb4``: PEFT's LoRA over bitsandbytes ``Linear4bit`` (NF4) — QLoRA as people run it today.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak RSS of a fresh process on
CPU (each CPU configuration runs in its own subprocess for that reason). Also timed: SLAO's task
boundary (``begin_task`` + ``end_task`` for the whole model) against a per-layer loop of
``torch.linalg.qr`` + merge. ``mbf bench`` runs the set that fits the machine and writes
``bench/results/<device>-<date>.json`` plus PNG plots; it never asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch


def _default_results_dir() -> Path:
    # a source checkout writes next to the benchmarks; an installed package into ./bench/results
    repo = Path(__file__).resolve().parent.parent / "bench"
    return repo / "results" if repo.is_dir() else Path.cwd() / "bench" / "results"


RESULTS_DIR = Path(os.environ.get("MBF_BENCH_RESULTS", _default_results_dir()))


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if (
        device is not None
        and torch.device(device).type == "cuda"
        or device is None
        and torch.cuda.is_available()
    ):
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def results_path(device: str, date: str | None = None) -> Path:
    date = date or _dt.date.today().isoformat()
    return RESULTS_DIR / f"{slug(device)}-{date}.json"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "transformers", "peft", "bitsandbytes", "mbf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is simply not recorded
            pass
    return out


def append_rows(rows: list[dict], path: Path | None = None) -> Path:
    """Append rows to the day's results file for their device (atomic rewrite)."""
    if not rows:
        raise ValueError("no rows to write")
    path = path or results_path(rows[0]["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.extend(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(existing, f, indent=1)
    os.replace(tmp, path)
    return path


def make_row(**fields) -> dict:
    row = {"date": _dt.date.today().isoformat(), "versions": versions()}
    row.update(fields)
    return row


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, rep: int = 10) -> dict:
    """Median / p20 / p80 milliseconds of ``fn``: CUDA events via ``triton.testing.do_bench`` on GPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "p20": q[1], "p80": q[7]}


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA bytes allocated while ``fn`` runs (None on CPU: use a fresh process's RSS there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def write_results(rows: list[dict], path: Path | None = None) -> Path:
    return append_rows(rows, path)


def plot_results(path: Path) -> list[Path]:
    """PNG plots beside a results file: train-step tokens/s and peak memory per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(Path(path).read_text()) if r["op"] == "train_step"]
    if not rows:
        return []
    cases = sorted({(r["shape"], r["M"], bool(r.get("checkpointing"))) for r in rows}, key=str)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases) + 4), 4.5))
    width = 0.8 / max(1, len(providers))
    for k, (key, label) in enumerate(
        (("tokens_per_s", "tokens / s"), ("peak_mem_bytes", "peak memory (GiB)"))
    ):
        ax = axes[k]
        for j, p in enumerate(providers):
            vals = []
            for case in cases:
                hit = [
                    r
                    for r in rows
                    if (r["shape"], r["M"], bool(r.get("checkpointing"))) == case and r["provider"] == p
                ]
                v = hit[0][key] if hit and hit[0].get(key) is not None else 0.0
                vals.append(v / 2**30 if key == "peak_mem_bytes" else v)
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{s}\nM={m}{' ckpt' if c else ''}" for s, m, c in cases], fontsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"training step — {rows[0]['device']} — {rows[0]['date']}")
    fig.tight_layout()
    out = Path(path).with_suffix(".train_step.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


MODEL_CONFIGS = {
    # field values from the models' published config.json files
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
PROVIDERS = ("mbf", "mbf-nf4", "peft", "peft-bnb4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StepConfig:
    """One measured configuration of a training step."""

    model: str = "smollm2-135m"  # a key of MODEL_CONFIGS
    layers: int | None = None  # decoder layers kept (None = all); recorded with the result
    provider: str = "mbf"  # one of PROVIDERS
    seq: int = 512  # tokens per sequence
    batch: int = 1  # sequences per step
    checkpointing: bool = False  # activation checkpointing of every decoder layer
    dtype: str = "bfloat16"  # compute dtype of the base model
    r: int = 16  # LoRA rank on all seven linears
    warmup: int = 2  # steps before timing
    steps: int = 5  # timed steps; the median is reported
    device: str = "cuda"


def build_model(cfg: StepConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A random-weight Llama with ``cfg.provider``'s adapters; returns (model, trainable params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(MODEL_CONFIGS[cfg.model])
    if cfg.layers is not None:
        fields["num_hidden_layers"] = cfg.layers
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = LlamaForCausalLM(LlamaConfig(**fields, max_position_embeddings=max(cfg.seq, 2048))).to(dtype)
    if cfg.provider in ("mbf", "mbf-nf4"):
        import mbf

        quant = "nf4" if cfg.provider == "mbf-nf4" else None
        mbf.inject(
            model, mbf.LoRAConfig(r=cfg.r, alpha=2 * cfg.r, target_modules="all-linear", quantize=quant)
        )
    else:
        from peft import LoraConfig, get_peft_model

        if cfg.provider == "peft-bnb4":
            _to_bnb4(model, dtype)
        model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=list(TARGETS)))
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _to_bnb4(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Swap every target linear for bitsandbytes' NF4 ``Linear4bit`` (quantised on the device)."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("provider peft-bnb4 needs bitsandbytes: pip install mbf-lora[qlora]") from err
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS:
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=dtype,
                quant_type="nf4",
                compress_statistics=True,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            q = q.to(mod.weight.device)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q)


def measure_step(cfg: StepConfig) -> dict:
    """Tokens/s (median over ``cfg.steps``) and peak memory of one training-step configuration."""
    model, params = build_model(cfg)
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = MODEL_CONFIGS[cfg.model]["vocab_size"]
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), device=cfg.device)
    cuda = torch.device(cfg.device).type == "cuda"

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(cfg.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "op": "train_step",
        "provider": cfg.provider,
        "mode": "full",
        "shape": f"{cfg.model} x{cfg.layers or MODEL_CONFIGS[cfg.model]['num_hidden_layers']}L",
        "M": cfg.batch * cfg.seq,
        "r": cfg.r,
        "dtype": cfg.dtype,
        "ms": median * 1e3,
        "p20": sorted(times)[len(times) // 5] * 1e3,
        "p80": sorted(times)[(4 * len(times)) // 5 - (len(times) % 5 == 0)] * 1e3,
        "tokens_per_s": cfg.batch * cfg.seq / median,
        "peak_mem_bytes": peak,
        "config": asdict(cfg),
        "extra_keys": ["tokens_per_s", "checkpointing"],
        "checkpointing": cfg.checkpointing,
    }


def measure_step_isolated(cfg: StepConfig) -> dict:
    """``measure_step`` in a fresh Python process, so CPU peak RSS is this configuration's alone."""
    code = (
        "import json, sys; from mbf.benchmark import StepConfig, measure_step; "
        "print(json.dumps(measure_step(StepConfig(**json.loads(sys.argv[1])))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg))], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{cfg}: benchmark subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_boundary(
    model_name: str, r: int, device: str, layers: int | None = None, rep: int = 3
) -> list[dict]:
    """SLAO's task boundary for every adapter of a model: batched ``ContinualLoRA`` vs a per-layer loop."""
    import mbf
    from mbf import reference

    fields = dict(MODEL_CONFIGS[model_name])
    n_layers = layers or fields["num_hidden_layers"]
    h, kv = (
        fields["hidden_size"],
        fields["hidden_size"] // fields["num_attention_heads"] * fields["num_key_value_heads"],
    )
    inter = fields["intermediate_size"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out) per linear
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            f"{i}_{t}": torch.nn.Linear(i_f, o_f, bias=False, device=device, dtype=torch.bfloat16)
            for i in range(n_layers)
            for t, (i_f, o_f) in zip(TARGETS, shapes)
        }
    )
    # ModuleDict keys become leaf names: inject by every key
    mbf.inject(model, mbf.LoRAConfig(r=r, target_modules=tuple(model.keys())))
    cl = mbf.ContinualLoRA(model)
    for layer in cl.layers.values():
        torch.nn.init.normal_(layer.lora_B)
    cl.begin_task()
    cl.end_task()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def batched() -> None:
        cl.begin_task()
        cl.end_task()

    def loop() -> None:
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_A.copy_(reference.orthonormal_rows(layer.lora_A))
                layer.merged_B.copy_(reference.time_aware_merge(layer.merged_B, layer.lora_B, 0.5))

    rows = []
    for provider, fn in (("mbf-batched", batched), ("per-layer-loop", loop)):
        fn()
        sync()
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "op": "task_boundary",
                "provider": provider,
                "mode": "begin+end",
                "shape": f"{model_name} x{n_layers}L ({len(cl.layers)} adapters)",
                "M": len(cl.layers),
                "r": r,
                "dtype": "bfloat16",
                "ms": statistics.median(times) * 1e3,
            }
        )
    loop_ms = rows[1]["ms"]
    for row in rows:
        row["ratio_to_floor"] = row["ms"] / loop_ms  # the loop is the reference point here
    return rows


def default_suite(cuda: bool) -> list[StepConfig]:
    """The full GPU set on CUDA; a quick CPU set (SmolLM2, fp32, short sequences) otherwise."""
    if not cuda:
        base = StepConfig(
            model="smollm2-135m", seq=256, batch=1, dtype="float32", warmup=1, steps=3, device="cpu"
        )
        return [replace(base, provider=p, checkpointing=c) for c in (False, True) for p in ("mbf", "peft")]
    suite = []
    for model, layers in (("llama-3-8b", 4), ("llama-2-7b", 4), ("smollm2-135m", None)):
        for seq in (512, 2048):
            for batch in (1, 4):
                for ckpt in (False, True):
                    for p in PROVIDERS:
                        suite.append(
                            StepConfig(
                                model=model,
                                layers=layers,
                                provider=p,
                                seq=seq,
                                batch=batch,
                                checkpointing=ckpt,
                            )
                        )
    return suite


def collect(configs: list[StepConfig], boundary: bool = True, cuda: bool = False) -> list[dict]:
    """Measure every configuration (a subprocess each on CPU) plus the task-boundary cost."""
    from tqdm import tqdm

    device = device_name("cuda" if cuda else "cpu")
    rows = []
    for cfg in tqdm(configs, desc="train steps", unit="config"):
        try:
            row = measure_step(cfg) if cuda else measure_step_isolated(cfg)
        except (RuntimeError, NotImplementedError, ImportError) as err:
            if cuda:
                torch.cuda.empty_cache()
            reason = str(err).splitlines()[-1]
            tqdm.write(f"skipped {cfg.provider} {cfg.model} seq={cfg.seq} batch={cfg.batch}: {reason}")
            continue
        rows.append(make_row(device=device, **row))
    if boundary:
        cases = (
            [("llama-3-8b", 16, None), ("smollm2-135m", 16, None)] if cuda else [("smollm2-135m", 16, None)]
        )
        for model_name, r, layers in tqdm(cases, desc="task boundary", unit="model"):
            for row in measure_boundary(model_name, r, "cuda" if cuda else "cpu", layers):
                rows.append(make_row(device=device, **row))
    _ratios_to_floor(rows)
    return rows


def _ratios_to_floor(rows: list[dict]) -> None:
    """Train-step rows get tokens/s relative to PEFT's (the provider people use today) in the same run."""
    peft = {
        (r["shape"], r["M"], r.get("checkpointing")): r
        for r in rows
        if r["op"] == "train_step" and r["provider"] == "peft"
    }
    for r in rows:
        ref = peft.get((r["shape"], r["M"], r.get("checkpointing")))
        if r["op"] == "train_step" and ref is not None:
            r["speedup_vs_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["extra_keys"] = ["tokens_per_s", "checkpointing", "speedup_vs_peft"]


def main(argv: list[str] | None = None) -> int:
    """``mbf bench``: run the suite that fits this machine and write results + plots."""
    parser = argparse.ArgumentParser(prog="mbf bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/<device>-<date>.json)"
    )
    parser.add_argument("--quick", action="store_true", help="the CPU set even on CUDA")
    parser.add_argument("--no-boundary", action="store_true", help="skip the task-boundary benchmark")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    rows = collect(default_suite(cuda), boundary=not args.no_boundary, cuda=cuda)
    path = write_results(rows, args.out)
    print(f"wrote {len(rows)} rows to {path}")
    for png in plot_results(path):
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

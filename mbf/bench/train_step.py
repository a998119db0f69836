"""End-to-end training step: tokens/s and peak memory of forward + backward + AdamW, per provider.

A step runs on a Llama decoder stack with random weights (Llama-3-8B, Llama-2-7B configs, a few
layers when memory demands — the count is recorded — and SmolLM2-135M). Providers:

- ``floor``: the same model and batch with the base frozen and no adapter, forward + backward through
  every layer down to the embeddings' output (made to require grad), no optimizer: the least a LoRA
  step on this model can cost (``ratio_to_floor`` is against it);
- ``peft``: PEFT's LoRA on the model (the baseline: ``ratio_to_baseline`` is against it);
- ``mbf``: ``mbf.inject`` on the model in the compute dtype (Triton on CUDA, torch on CPU);
- ``peft-bnb4``: PEFT's LoRA over bitsandbytes ``Linear4bit`` (NF4): QLoRA as people run it today;
- ``mbf-nf4``: ``mbf.inject`` with ``LoRAConfig(quantize="nf4")``.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak RSS of a fresh process on
CPU (``measure_step_isolated``). On CPU the time comes from ``measure_interleaved``: the providers'
models side by side in one process, one step of each in turn.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from mbf._optional import require
from mbf.bench.providers import bnb_nf4_linear
from mbf.bench.rows import FLOOR
from mbf.bench.timing import peak_rss, reset_peak_rss, summarize, time_fn
from mbf.config import LLAMA_LINEARS

__all__ = [
    "MODEL_CONFIGS",
    "PROVIDERS",
    "StepConfig",
    "build_model",
    "measure_interleaved",
    "measure_step",
    "measure_step_isolated",
]

_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rope_theta",
    "tie_word_embeddings",
)
# LlamaConfig fields, values from the models' published config.json files
MODEL_CONFIGS = {
    name: dict(zip(_CONFIG_FIELDS, values))
    for name, values in (
        ("smollm2-135m", (49152, 576, 1536, 30, 9, 3, 100000.0, True)),
        ("llama-3-8b", (128256, 4096, 14336, 32, 32, 8, 500000.0, False)),
        ("llama-2-7b", (32000, 4096, 11008, 32, 32, 32, 10000.0, False)),
    )
}
EMBEDDED = "smollm2-135m-embedded"  # SmolLM2-135M-Instruct's real weights (mbf.experiment.models)
MODEL_CONFIGS[EMBEDDED] = MODEL_CONFIGS["smollm2-135m"]
# the references first: a row's ratios are taken against references measured before it
PROVIDERS = ("floor", "peft", "mbf", "peft-bnb4", "mbf-nf4")
BASELINE = "peft"


@dataclass(frozen=True)
class StepConfig:
    """One measured configuration of a training step."""

    model: str = "smollm2-135m"  # a key of MODEL_CONFIGS
    layers: int | None = None  # decoder layers kept (None = all); recorded with the result
    provider: str = "mbf"  # one of PROVIDERS
    seq: int = 512  # tokens per sequence
    batch: int = 1  # sequences per step
    checkpointing: bool = False  # activation checkpointing of every decoder layer
    dtype: str = "bfloat16"  # the base model's dtype (the adapters are float32 over a 16-bit base)
    r: int = 16  # LoRA rank
    targets: str = "all-linear"  # the adapted linears: "all-linear" (all seven) or comma-separated names
    warmup: int = 2  # steps before timing
    steps: int = 5  # timed steps; the median is reported
    device: str = "cuda"


def build_model(cfg: StepConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A random-weight Llama with ``cfg.provider``'s adapters; returns (model, trainable params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    if cfg.model == EMBEDDED:  # the real weights of the package's embedded model
        from mbf.experiment.models import load_model

        model = load_model(dtype=dtype)[0].to(cfg.device)
        if cfg.layers is not None:
            del model.model.layers[cfg.layers :]
            model.config.num_hidden_layers = cfg.layers
    else:
        fields = dict(MODEL_CONFIGS[cfg.model])
        if cfg.layers is not None:
            fields["num_hidden_layers"] = cfg.layers
        with torch.device(cfg.device):
            config = LlamaConfig(**fields, max_position_embeddings=max(cfg.seq, 2048))
            model = LlamaForCausalLM(config).to(dtype)
    targets = tuple(LLAMA_LINEARS) if cfg.targets == "all-linear" else tuple(cfg.targets.split(","))
    if cfg.provider == FLOOR:
        model.requires_grad_(False)
        # backward then reaches every layer, down to the embeddings' output (the first layer's dX too)
        model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    elif cfg.provider in ("mbf", "mbf-nf4"):
        import mbf

        quant = "nf4" if cfg.provider == "mbf-nf4" else None
        mbf.inject(model, mbf.LoRAConfig(r=cfg.r, alpha=2 * cfg.r, target_modules=targets, quantize=quant))
    else:
        require("the PEFT rows of mbf.bench", ("peft",))
        from peft import LoraConfig, get_peft_model

        if cfg.provider == "peft-bnb4":
            _to_bnb4(model, dtype)
        # PEFT's default autocast_adapter_dtype keeps the adapters float32 over a 16-bit base, as mbf does
        model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=list(targets)))
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _to_bnb4(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Swap every projection linear for bitsandbytes' NF4 ``Linear4bit``."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] in LLAMA_LINEARS:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, bnb_nf4_linear(mod, dtype))


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied or viewed tensor counts once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps an NF4 weight's absmax, code and their nested quantisation in the weight's
    ``quant_state``, not in parameters or buffers: they count as weights too."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for state in (qs, getattr(qs, "state2", None)):
            out += [
                getattr(state, a)
                for a in ("absmax", "code", "offset")
                if isinstance(getattr(state, a, None), torch.Tensor)
            ]
    return out


def memory_bytes(step: Callable[[], None], model: torch.nn.Module, opt) -> dict:
    """What one step holds, by kind (bytes; they carry over from CPU to GPU, the times do not):
    ``weights_bytes`` (frozen parameters and buffers: NF4 codes, absmax, constants, or 16-bit weights),
    ``adapter_bytes`` (trainable parameters; their gradients as much again), ``merged_adapter_bytes``
    (mbf's frozen copy of the adapter: SLAO's merged adapter, which plain LoRA does not keep),
    ``optimizer_bytes`` (AdamW's state) and ``activation_bytes`` (tensors saved for backward that
    are not weights, read by ``saved_tensors_hooks`` during one more step)."""
    merged = [b for n, b in model.named_buffers() if n.rpartition(".")[2] in ("merged_A", "merged_B")]
    merged_ptrs = {b.untyped_storage().data_ptr() for b in merged}
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    frozen = [t for t in frozen if t.untyped_storage().data_ptr() not in merged_ptrs]
    frozen += _quant_state_tensors(model)
    weights = {t.untyped_storage().data_ptr() for t in [*frozen, *merged]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    state = [
        v for s in (opt.state.values() if opt else ()) for v in s.values() if isinstance(v, torch.Tensor)
    ]
    return {
        "weights_bytes": _bytes(frozen),
        "adapter_bytes": _bytes([p for p in model.parameters() if p.requires_grad]),
        "merged_adapter_bytes": _bytes(merged),
        "optimizer_bytes": _bytes(state),
        "activation_bytes": sum(saved.values()),
    }


MEMORY_KEYS = (
    "weights_bytes",
    "adapter_bytes",
    "merged_adapter_bytes",
    "optimizer_bytes",
    "activation_bytes",
)


def _step_fn(
    cfg: StepConfig, model_out: list | None = None
) -> tuple[Callable[[], None], list[torch.nn.Parameter]]:
    """``(one training step of cfg's model, its trainable parameters)``: forward, backward, AdamW
    (``model_out`` receives the model and the optimizer)."""
    model, params = build_model(cfg)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # the floor trains nothing
    if model_out is not None:
        model_out.extend((model, opt))
    vocab = MODEL_CONFIGS[cfg.model]["vocab_size"]
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), device=cfg.device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, params


def _row(cfg: StepConfig, params: list[torch.nn.Parameter], t: dict, peak: int | None) -> dict:
    """The row of ``cfg`` timed ``t`` (``time_fn``'s dict), without ``device``, ``date``, ``versions``."""
    return {
        "op": "train_step",
        "provider": cfg.provider,
        "mode": "full",
        "shape": f"{cfg.model} x{cfg.layers or MODEL_CONFIGS[cfg.model]['num_hidden_layers']}L",
        "M": cfg.batch * cfg.seq,
        "r": cfg.r,
        "dtype": cfg.dtype,
        "targets": cfg.targets,
        "adapter_dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        **t,
        "tokens_per_s": cfg.batch * cfg.seq / (t["ms"] * 1e-3),
        "peak_mem_bytes": peak,
        "config": asdict(cfg),
        "extra_keys": ["tokens_per_s", "checkpointing", "targets", "adapter_dtype"],
        "checkpointing": cfg.checkpointing,
        "threads": torch.get_num_threads(),
    }


def measure_step(cfg: StepConfig) -> dict:
    """Tokens/s (median over ``cfg.steps``) and peak memory of one training-step configuration.

    ``cfg.warmup == 0`` and ``cfg.steps == 1`` (``once``): a single step, the first, timed under the
    memory hooks: what a step too slow to repeat costs (a 16-bit step a CPU emulates), its peak memory
    that of a first step (optimizer state allocated in it), ``single_step`` in the row.

    Returns:
        A row without ``device``, ``date`` and ``versions`` (``make_row`` adds them).
    """
    held: list = []
    step, params = _step_fn(cfg, held)
    cuda = torch.device(cfg.device).type == "cuda"
    if (cfg.warmup, cfg.steps) == (0, 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        t0 = time.perf_counter()
        memory = memory_bytes(step, *held)
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
        row = _row(cfg, params, {**summarize([ms]), "samples": [ms]}, peak)
        row.update(memory, single_step=True)
        row["extra_keys"] = [*row["extra_keys"], *MEMORY_KEYS, "single_step"]
        return row
    for _ in range(cfg.warmup):  # before the peak-memory reset: optimizer state is allocated here
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # the peak of the training steps, not of loading the model
    t = time_fn(step, cfg.device, warmup=0, rep=cfg.steps, events=False, samples=True)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    row = _row(cfg, params, t, peak)
    row.update(memory_bytes(step, *held))
    row["extra_keys"] = [*row["extra_keys"], *MEMORY_KEYS]
    return row


def measure_interleaved(configs: list[StepConfig], rounds: int) -> list[dict]:
    """CPU configurations side by side in this process: one step of each in turn, ``rounds`` times.

    On a shared machine the load drifts by the minute; steps of the providers taken seconds apart see
    the same load, so their ratio holds where separate runs would not. The order rotates each round.
    No peak memory here (the models share the process): ``measure_step_isolated`` gives it.

    Returns:
        One row per configuration, in ``configs`` order, with every step's ms in ``samples``.
    """
    steps = [_step_fn(cfg) for cfg in configs]
    for cfg, (step, _) in zip(configs, steps):
        for _ in range(cfg.warmup):
            step()
    samples: list[list[float]] = [[] for _ in configs]
    for k in range(rounds):
        for i in [*range(k % len(configs), len(configs)), *range(k % len(configs))]:
            t0 = time.perf_counter()
            steps[i][0]()
            samples[i].append((time.perf_counter() - t0) * 1e3)
    return [
        _row(cfg, params, {**summarize(ms), "samples": ms, "rounds": rounds}, None)
        for cfg, (_, params), ms in zip(configs, steps, samples)
    ]


def measure_step_isolated(cfg: StepConfig) -> dict:
    """``measure_step`` in a fresh Python process, so that CPU peak RSS is this configuration's alone.

    Raises:
        RuntimeError: when the subprocess fails (with the end of its stderr).
    """
    code = (
        "import json, sys; from mbf.bench.train_step import StepConfig, measure_step; "
        "print(json.dumps(measure_step(StepConfig(**json.loads(sys.argv[1])))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(cfg))], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{cfg}: benchmark subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

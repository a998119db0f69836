"""SLAO's task boundary for every adapter of a model: ``ContinualLoRA``'s batched calls against the
per-layer loop one writes without batching (``torch.linalg.qr`` + merge, layer by layer)."""

from __future__ import annotations

import torch

from mbf.bench.timing import time_fn
from mbf.bench.train_step import MODEL_CONFIGS
from mbf.config import LLAMA_LINEARS

__all__ = ["BASELINE", "measure_boundary"]

BASELINE = "per-layer-loop"


def _adapted_linears(model_name: str, layers: int | None, device: str) -> torch.nn.ModuleDict:
    """Every projection linear of ``model_name`` (bf16, random), as one flat ModuleDict."""
    fields = MODEL_CONFIGS[model_name]
    h, inter = fields["hidden_size"], fields["intermediate_size"]
    kv = h // fields["num_attention_heads"] * fields["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out) per linear
    n_layers = layers or fields["num_hidden_layers"]
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            f"{i}_{t}": torch.nn.Linear(i_f, o_f, bias=False, device=device, dtype=torch.bfloat16)
            for i in range(n_layers)
            for t, (i_f, o_f) in zip(LLAMA_LINEARS, shapes)
        }
    )


def measure_boundary(
    model_name: str, r: int, device: str, layers: int | None = None, rep: int = 3
) -> list[dict]:
    """``begin_task`` + ``end_task`` for the whole model, batched and as a per-layer loop.

    Returns:
        Two rows (the loop first, the baseline of the other), without ``device``/``date``/``versions``.
    """
    import mbf

    model = _adapted_linears(model_name, layers, device)
    # ModuleDict keys become leaf names: inject by every key
    mbf.inject(model, mbf.LoRAConfig(r=r, target_modules=tuple(model.keys())))
    cl = mbf.ContinualLoRA(model)
    for layer in cl.layers.values():
        torch.nn.init.normal_(layer.lora_B)
    cl.begin_task()
    cl.end_task()

    def batched() -> None:
        cl.begin_task()
        cl.end_task()

    def loop() -> None:  # QR with diag(R) >= 0, then the merge, one layer at a time (fp32 adapters)
        with torch.no_grad():
            for layer in cl.layers.values():
                Q, R = torch.linalg.qr(layer.lora_A.float().T)
                layer.lora_A.copy_((Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).T)
                layer.merged_B.lerp_(layer.lora_B.float(), 0.5)

    n_layers = layers or MODEL_CONFIGS[model_name]["num_hidden_layers"]
    return [
        {
            "op": "task_boundary",
            "provider": provider,
            "mode": "begin+end",
            "shape": f"{model_name} x{n_layers}L ({len(cl.layers)} adapters)",
            "M": len(cl.layers),
            "r": r,
            "dtype": "bfloat16",
            **time_fn(fn, device, warmup=1, rep=rep, events=False),
        }
        for provider, fn in ((BASELINE, loop), ("mbf-batched", batched))
    ]

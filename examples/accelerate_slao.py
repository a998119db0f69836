"""SLAO with Hugging Face accelerate: one process per GPU (or CPU process), the same code on every rank.

    accelerate launch --num_processes 2 examples/accelerate_slao.py          # 2 GPUs (DDP)
    accelerate launch --cpu --num_processes 2 examples/accelerate_slao.py    # 2 CPU processes (gloo)
    python examples/accelerate_slao.py                                       # one process

Every rank runs every task boundary (``begin_task`` / ``end_task``) and ``save``: the adapters
stay identical replicas (DDP) and ``mbf`` checks that no rank skips one. Rank 0 writes the files.
Tiny random Llama and random token data, so it runs anywhere in seconds: swap in your model and
your tasks' data loaders.
"""

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import mbf


def task_batches(task: int, steps: int, batch: int = 4, length: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(task)  # each task: its own token distribution
    low = 2 + 20 * task
    return [torch.randint(low, low + 20, (batch, length), generator=g) for _ in range(steps)]


def main() -> None:
    accelerator = Accelerator()
    torch.manual_seed(0)  # the same base weights and adapter init on every rank
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    mbf.inject(model, mbf.LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    cl = mbf.ContinualLoRA(model)  # SLAO
    wrapped = accelerator.prepare(model)
    for task in range(3):
        cl.begin_task()  # every rank
        opt = accelerator.prepare(torch.optim.AdamW(cl.trainable_parameters(), lr=1e-2))
        for ids in task_batches(task, steps=10):
            loss = wrapped(input_ids=ids.to(accelerator.device), labels=ids.to(accelerator.device)).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        cl.end_task()  # every rank: the time-aware merge
        accelerator.print(f"task {task + 1}: loss {loss.item():.3f}, lambda {cl.lam(task + 1):.3f}")
    cl.save("runs/accelerate-slao")  # every rank calls it; rank 0 writes
    accelerator.print("saved runs/accelerate-slao (ContinualLoRA.load(model, path) reads it back)")


if __name__ == "__main__":
    main()

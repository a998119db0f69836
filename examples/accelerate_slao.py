"""SLAO with Hugging Face accelerate: one process per GPU (or CPU process), the same code on every rank.

    torchrun --standalone --nproc-per-node 2 examples/accelerate_slao.py   # 2 processes: CPU (gloo) or GPUs
    accelerate launch --num_processes 2 examples/accelerate_slao.py        # 2 GPUs (DDP)
    python examples/accelerate_slao.py                                     # one process

On a machine without a GPU the script asks accelerate for its CPU mode, so ``torchrun`` gives one
world of 2 ranks over gloo. (``accelerate launch --cpu --num_processes 2`` starts one process only:
accelerate's launcher spreads CPU processes with MPI, not by itself; the script then stops with a
message rather than train alone as a world of 1: use ``torchrun`` on CPUs.)

Every rank runs every task boundary (``begin_task`` / ``end_task``) and ``save``: the adapters
stay identical replicas (DDP) and ``mbf`` checks that no rank skips one. Rank 0 writes the files. At
the end every rank compares its adapters with the others' and says whether they agree (CI runs the
``torchrun`` line with 2 CPU processes and checks it). Tiny random Llama and random token data, so it
runs anywhere in seconds: swap in your model and your tasks' data loaders.
"""

import argparse
import os

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import mbf


def task_batches(task: int, steps: int, batch: int = 4, length: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(task)  # each task: its own token distribution
    low = 2 + 20 * task
    return [torch.randint(low, low + 20, (batch, length), generator=g) for _ in range(steps)]


def started_alone_by_accelerate(accelerator: Accelerator) -> bool:
    """True when ``accelerate launch --cpu --num_processes N`` (N > 1, no ``--mpirun_hostfile``) started this
    script once: accelerate sets MASTER_ADDR for the N processes but starts only this one, and nothing
    (torchrun's RANK, MPI's world size) makes it a rank of a larger world."""
    env = os.environ
    ranked = ("RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return (
        accelerator.num_processes == 1
        and env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
        and "MASTER_ADDR" in env
        and not any(key in env for key in ranked)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate-slao", help="where rank 0 saves SLAO's state")
    parser.add_argument("--steps", type=int, default=10, help="training steps per task")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across torchrun's ranks
    if started_alone_by_accelerate(accelerator):
        raise SystemExit(
            "accelerate launch --cpu --num_processes N started this script as one process (accelerate "
            "starts several CPU processes only through mpirun: --mpirun_hostfile); it would train alone as a "
            "world of 1. Run torchrun --standalone --nproc-per-node N examples/accelerate_slao.py instead "
            "(or python examples/accelerate_slao.py for one process)"
        )
    accelerator.print(f"world {accelerator.num_processes} ({accelerator.distributed_type.value})")
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
        for ids in task_batches(task, steps=args.steps):  # your DataLoader, through accelerator.prepare
            loss = wrapped(input_ids=ids.to(accelerator.device), labels=ids.to(accelerator.device)).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        cl.end_task()  # every rank: the time-aware merge
        accelerator.print(f"task {task + 1}: loss {loss.item():.3f}, lambda {cl.lam(task + 1):.3f}")
    cl.save(args.out)  # every rank calls it; rank 0 writes
    # every rank's adapters, both of them, as one fingerprint: replicas must be equal
    tensors = cl.state_dict()["tensors"]
    mine = torch.stack([tensors[k].double().sum() for k in sorted(tensors)]).to(accelerator.device)
    every = accelerator.gather(mine[None])  # (world, n)
    if not torch.equal(every, mine[None].expand_as(every)):
        raise SystemExit(f"rank {accelerator.process_index}: the ranks' adapters differ")
    accelerator.print(f"ranks agree: {accelerator.num_processes} identical replicas after 3 tasks")
    accelerator.print(f"saved {args.out} (ContinualLoRA.load(model, path) reads it back)")
    # leave together: a rank that tears gloo down while its peer still talks aborts the peer's process
    # ("terminate called without an active exception"; tests/fixtures/dist_worker.py closes the same way)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()

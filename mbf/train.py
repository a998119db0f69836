"""The training loop and the evaluation of continual runs.

``run_continual`` trains a sequence of tasks with one method, evaluates every task seen so far
after each task with the adapter inference would use (the merged one), and writes the run
directory after every task, atomically, so that ``resume=True`` continues from the last finished
task and a crash loses at most the task in progress:

    OUT/results.json          the results (schema in mbf/report.py), the commit point of a task
    OUT/checkpoints/task-NN   ContinualLoRA.save() after task NN (only the latest is kept)

Methods (``METHODS``): ``slao`` and its ablations are ContinualLoRA options; ``seq-lora`` is one
LoRA fine-tuned on and on (no QR, λ ≡ 1: merged = fine-tuned); ``multi-task`` trains one LoRA on
all tasks' data at once (the upper bound, one evaluation at the end).
"""

from __future__ import annotations

import inspect
import math
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mbf.config import LoRAConfig
from mbf.continual import ContinualLoRA
from mbf.inject import inject
from mbf.tasks import Example, Task, accuracy_metrics, exact_match

__all__ = ["METHODS", "Codec", "TrainOptions", "evaluate", "method_options", "run_continual", "train_steps"]

# method -> ContinualLoRA options (None: not a ContinualLoRA sequence)
METHODS: dict[str, dict | None] = {
    "slao": {"init": "orthogonal", "schedule": "sqrt"},
    "seq-lora": {"init": "none", "schedule": "none"},
    "ftba-mb": {"init": "none", "schedule": "sqrt"},  # SLAO without the orthogonal (QR) init
    "slao-inverse": {"init": "orthogonal", "schedule": "inverse"},
    "slao-constant": {"init": "orthogonal", "schedule": "constant"},
    "slao-random": {"init": "random", "schedule": "sqrt"},
    "slao-last-merge": {"init": "last_merge", "schedule": "sqrt"},
    "multi-task": None,
}


def method_options(
    method: str, init: str | None = None, schedule: str | None = None, constant: float = 0.5
) -> dict | None:
    """ContinualLoRA options of ``method`` with the ``init`` / ``schedule`` overrides applied.

    Raises:
        ValueError: on an unknown method, or an override given to ``multi-task``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    opts = METHODS[method]
    if opts is None:
        if init or schedule:
            raise ValueError("multi-task trains one adapter once: --init/--schedule do not apply")
        return None
    return {
        **opts,
        **({"init": init} if init else {}),
        **({"schedule": schedule} if schedule else {}),
        "constant": float(constant),
    }


@dataclass
class Codec:
    """Text ↔ token ids. ``Codec.from_tokenizer(hf_tokenizer)``, or any callables (tests use characters)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tok) -> Codec:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(
            encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            eos_id=tok.eos_token_id,
            pad_id=pad,
        )


@dataclass
class TrainOptions:
    """How each task is trained and evaluated."""

    lr: float = 1e-3  # AdamW learning rate (constant, after a short warm-up)
    epochs: float = 1.0  # passes over a task's training set (fractions allowed)
    max_steps: int | None = None  # cap on optimizer steps per task (None: from epochs)
    batch_size: int = 8
    eval_batch_size: int = 50
    max_length: int = 256  # prompt tokens kept (the end of a longer prompt is kept)
    weight_decay: float = 0.0
    warmup_steps: int = 3
    seed: int = 0

    def steps_for(self, n_examples: int) -> int:
        steps = max(1, math.ceil(self.epochs * n_examples / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps


# -- batches ------------------------------------------------------------------------------------------


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(B, T)`` ids and attention mask: every sequence ends at the last column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def encode_example(codec: Codec, task: Task, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids + eos)``; the prompt is cut from the left to ``max_length``."""
    prompt = codec.encode(task.prompt(ex))[-max_length:]
    return prompt, codec.encode(task.target(ex)) + [codec.eos_id]


def answer_loss(model: nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only.

    Sequences are left-padded so every answer sits in the last columns; the LM head (a 49k-vocab
    GEMM, the costliest layer of a small model) runs only on those columns.
    """
    seqs = [p + a for p, a in batch]
    ids, mask = _left_pad(seqs, pad_id)  # (B, T)
    K = max(len(a) for _, a in batch)  # answer columns
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).last_hidden_state
    logits = model.lm_head(hidden[:, -K - 1 : -1]).float()  # (B, K, V): column t predicts token t+1
    labels = torch.full((len(batch), K), -100, dtype=torch.long)
    for i, (_, a) in enumerate(batch):
        labels[i, K - len(a) :] = torch.tensor(a)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def train_steps(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    codec: Codec,
    examples: list[tuple[Task, Example]],
    opts: TrainOptions,
    seed: int,
    desc: str = "train",
) -> dict:
    """Train ``params`` with AdamW on ``examples`` for ``opts.steps_for(len(examples))`` steps.

    Returns:
        ``{"steps", "first_loss", "final_loss"}`` (final: mean of the last 5 steps).
    """
    rng = random.Random(seed)
    encoded = [encode_example(codec, t, ex, opts.max_length) for t, ex in examples]
    steps = opts.steps_for(len(encoded))
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, opts.warmup_steps)))
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(
        range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=None
    )  # None: off without a tty
    for _ in bar:
        if len(order) < opts.batch_size:
            perm = list(range(len(encoded)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: opts.batch_size], order[opts.batch_size :]
        loss = answer_loss(model, [encoded[i] for i in idx], codec.pad_id)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {len(losses)}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:])}


# -- evaluation ---------------------------------------------------------------------------------------


def _cache_kwarg(model: nn.Module, out) -> dict:
    """The KV cache of ``out`` under the name this transformers version takes (``cache`` from 5.x)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """Greedy continuation of a batch of prompts with the KV cache; each stops at eos (excluded)."""
    ids, mask = _left_pad(prompts, pad_id)
    pos = _positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
        for i in range(len(prompts)):
            if not done[i]:
                if nxt[i].item() == eos_id:
                    done[i] = True
                else:
                    generated[i].append(nxt[i].item())
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **_cache_kwarg(model, out),
        )
    return generated


def evaluate(
    model: nn.Module, codec: Codec, task: Task, opts: TrainOptions, desc: str | None = None
) -> float:
    """Exact-match accuracy of greedy decoding on ``task.test``.

    The model is used as it is: choose the adapter first (``with cl.merged():``).
    """
    model.eval()
    prompts = [encode_example(codec, task, ex, opts.max_length)[0] for ex in task.test]
    max_new = max(len(codec.encode(task.target(ex))) for ex in task.test) + 1
    correct = 0
    bs = opts.eval_batch_size
    for s in tqdm(
        range(0, len(prompts), bs),
        desc=desc or f"eval {task.name}",
        leave=False,
        dynamic_ncols=True,
        disable=None,
    ):
        outs = greedy_decode(model, prompts[s : s + bs], max_new, codec.eos_id, codec.pad_id)
        correct += sum(exact_match(codec.decode(o), ex.output) for o, ex in zip(outs, task.test[s : s + bs]))
    return correct / len(task.test)


# -- a continual run ----------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _adapter_bytes(model: nn.Module, cl: ContinualLoRA | None) -> int:
    if cl is not None:
        return cl.adapter_bytes()
    from mbf.inject import lora_layers

    return sum(
        t.numel() * t.element_size() for m in lora_layers(model).values() for t in (m.lora_A, m.lora_B)
    )


def run_continual(
    model: nn.Module,
    codec: Codec,
    tasks: list[Task],
    out: str | Path,
    *,
    method: str = "slao",
    lora: LoRAConfig | None = None,
    opts: TrainOptions | None = None,
    init: str | None = None,
    schedule: str | None = None,
    constant: float = 0.5,
    resume: bool = False,
    meta: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``tasks`` in order with ``method``; write ``out/results.json`` after every task.

    Args:
        model: a causal LM without LoRA layers (``model.model`` the decoder, ``model.lm_head``).
        codec: its tokenizer as a ``Codec``.
        tasks: the task sequence.
        out: the run directory.
        method: one of ``METHODS``; ``init`` / ``schedule`` / ``constant`` override its options.
        lora: the adapter configuration (default ``LoRAConfig()``: r 8, q_proj and v_proj).
        opts: training options (seeds per task derive from ``opts.seed``).
        resume: continue the run in ``out`` from its last finished task.
        meta: extra fields for results.json (suite, model name...).

    Returns:
        The results dict (also in ``out/results.json``).

    Raises:
        FileExistsError: when ``out`` holds a run and ``resume`` is False.
        ValueError: on resume, when the saved run's method, seed, tasks or options differ.
    """
    from mbf import report  # the results writer; report imports nothing from here

    out = Path(out)
    lora = lora or LoRAConfig()
    opts = opts or TrainOptions()
    cl_opts = method_options(method, init, schedule, constant)
    results_path = out / "results.json"
    config = {
        "method": method,
        "options": cl_opts,
        "seed": opts.seed,
        "tasks": [t.name for t in tasks],
        "lora": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(lora).items()},
        "train": asdict(opts),
        **(meta or {}),
    }
    if results_path.exists() and not resume:
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and results_path.exists():
        results = report.read_results(results_path)
        for key in ("method", "options", "seed", "tasks", "lora"):
            if results.get(key) != config[key]:
                raise ValueError(
                    f"--resume: {out} was run with {key}={results.get(key)!r}, now {config[key]!r}"
                )
    else:
        results = report.new_results(config)

    torch.manual_seed(opts.seed)
    inject(model, lora)
    cl = ContinualLoRA(model, **cl_opts) if cl_opts is not None else None
    done = len(results["per_task"])
    if done and results.get("checkpoint"):
        if cl is None:
            log(f"{out}: run already complete")
            return results
        cl = ContinualLoRA.load(model, out / results["checkpoint"])
        log(f"resuming {out} after task {done}/{len(tasks)} ({tasks[done - 1].name})")

    if method == "multi-task":
        if not done:
            t0 = time.time()
            mixed = [(t, ex) for t in tasks for ex in t.train]
            torch.manual_seed(opts.seed)
            steps_opts = TrainOptions(
                **{**asdict(opts), "max_steps": (opts.max_steps or 0) * len(tasks) or None}
            )
            stats = train_steps(
                model,
                [p for p in model.parameters() if p.requires_grad],
                codec,
                mixed,
                steps_opts,
                seed=opts.seed,
                desc="train multi-task",
            )
            train_s = time.time() - t0
            t0 = time.time()
            row = [evaluate(model, codec, t, opts) for t in tasks]
            report.add_stage(
                results,
                "all",
                row,
                stats,
                train_s,
                time.time() - t0,
                _adapter_bytes(model, None),
                peak_rss_mb(),
                checkpoint=None,
            )
            report.finish(results, multi_task=True)
            report.write_run(out, results)
        return results

    assert cl is not None
    for i in range(done, len(tasks)):
        task = tasks[i]
        t0 = time.time()
        # per-task seeds, set before begin_task (init="random" draws there): a resumed run equals an
        # uninterrupted one
        torch.manual_seed(opts.seed * 1000 + i)
        cl.begin_task()
        stats = train_steps(
            model,
            cl.trainable_parameters(),
            codec,
            [(task, ex) for ex in task.train],
            opts,
            seed=opts.seed * 1000 + i,
            desc=f"train {i + 1}/{len(tasks)} {task.name}",
        )
        cl.end_task()
        train_s = time.time() - t0
        t0 = time.time()
        with cl.merged():  # what inference uses
            row = [
                evaluate(model, codec, t, opts, desc=f"eval {t.name} after {task.name}")
                for t in tasks[: i + 1]
            ]
        eval_s = time.time() - t0
        ckpt = f"checkpoints/task-{i + 1:02d}"
        cl.save(out / ckpt)
        report.add_stage(
            results, task.name, row, stats, train_s, eval_s, cl.adapter_bytes(), peak_rss_mb(), ckpt
        )
        if i == len(tasks) - 1:
            report.finish(results)
        report.write_run(out, results)  # the commit point: results.json names the new checkpoint
        for old in (out / "checkpoints").glob("task-*"):
            if old.name != Path(ckpt).name:
                shutil.rmtree(old, ignore_errors=True)
        log(
            f"[{method}] task {i + 1}/{len(tasks)} {task.name}: loss {stats['first_loss']:.3f}->"
            f"{stats['final_loss']:.3f}, acc {' '.join(f'{a:.2f}' for a in row)} "
            f"(train {train_s:.0f}s, eval {eval_s:.0f}s)"
        )
    if results["metrics"]["AA"] is None and len(results["per_task"]) == len(tasks):
        results["metrics"].update(accuracy_metrics(results["accuracy"]))
    return results

"""Training: the options of a task's training, the answer-only loss, and the optimizer loop."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mbf.experiment.batches import Codec, encode_example, left_pad, positions
from mbf.experiment.tasks import Example, Task

__all__ = [
    "PROMPT_FORMATS",
    "SCORERS",
    "TrainOptions",
    "answer_loss",
    "progress",
    "run_inputs",
    "train_steps",
]


SCORERS = ("generate", "rank", "both")  # how a test answer is scored (see evaluate.py)
PROMPT_FORMATS = ("plain", "chat")  # the prompt as plain text, or inside the model's chat template


@dataclass(frozen=True)
class TrainOptions:
    """How each task is trained and evaluated. Every default is written here once: the presets
    (``mbf.experiment.presets``) and the command line state only what they change.

    Raises:
        ValueError: on a value out of range, naming the field.
    """

    lr: float = 1e-3  # AdamW learning rate (constant, after a short warm-up)
    epochs: float = 1.0  # passes over a task's training set (fractions allowed)
    max_steps: int | None = None  # cap on optimizer steps per task (None: from epochs)
    batch_size: int = 8  # examples per forward/backward (micro-batch)
    eval_batch_size: int = 50  # test prompts scored at once (a memory knob: never changes a score)
    max_length: int = 256  # prompt tokens kept: a longer input is cut, never the instruction or options
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 3  # linear warm-up of the learning rate over the first steps of each task
    seed: int = 0  # seeds the data order of each task, the adapter init and (by default) the suite
    grad_accum: int = 1  # micro-batches per optimizer step (the paper: batch 1 x 8 accumulation)
    scoring: str = "generate"  # "generate" (exact match of greedy decoding), "rank" (best option), "both"
    prompt_format: str = "plain"  # "plain" text, or "chat": inside the model's chat template
    offdiag_test: int | None = None  # off-diagonal cells (j < i < T-1, used by no metric): first N tests only

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(
                f"TrainOptions: batch_size={self.batch_size}, grad_accum={self.grad_accum} and "
                f"eval_batch_size={self.eval_batch_size} must be >= 1"
            )
        if not (self.lr > 0 and self.epochs > 0 and self.weight_decay >= 0 and self.warmup_steps >= 0):
            raise ValueError(
                f"TrainOptions: lr={self.lr} and epochs={self.epochs} must be > 0, weight_decay="
                f"{self.weight_decay} and warmup_steps={self.warmup_steps} >= 0"
            )
        if self.offdiag_test is not None and self.offdiag_test < 1:
            raise ValueError(f"TrainOptions: offdiag_test={self.offdiag_test} must be >= 1 or None")
        if self.scoring not in SCORERS:
            raise ValueError(f"TrainOptions: scoring {self.scoring!r} must be one of {', '.join(SCORERS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"TrainOptions: prompt_format {self.prompt_format!r} must be one of "
                f"{', '.join(PROMPT_FORMATS)}"
            )

    def to_dict(self) -> dict:
        """results.json's ``train``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainOptions:
        """Inverse of ``to_dict``; fields an older file lacks take their defaults."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def steps_for(self, n_examples: int) -> int:
        """Optimizer steps for ``n_examples``: ``epochs`` passes of ``batch_size × grad_accum`` examples
        per step, capped by ``max_steps``; at least 1."""
        steps = max(1, math.ceil(self.epochs * n_examples / (self.batch_size * self.grad_accum)))
        return min(steps, self.max_steps) if self.max_steps else steps


def progress(items: Iterable, desc: str) -> tqdm:
    """A progress bar that clears itself when done and stays off without a terminal (``disable=None``)."""
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def answer_loss(model: nn.Module, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only (a 0-d float32 tensor).

    Args:
        model: a causal LM with ``model.model`` (the decoder) and ``model.lm_head``.
        batch: ``(prompt ids, answer ids)`` pairs, as ``encode_example`` gives them.
        pad_id: the padding id.

    The LM head (a 49k-vocab GEMM, the costliest layer of a small model) runs only on the answer
    columns, which left padding puts last, made contiguous first: on the strided slice torch's matmul
    goes the batched way and copies the head's weight once per sequence (SmolLM2, 8 sequences, 3
    answer columns: 0.42 s in float32 and 1.5 s in bfloat16, against 0.07 s and 0.02 s).
    """
    ids, mask = left_pad([p + a for p, a in batch], pad_id)  # (B, T)
    K = max(len(a) for _, a in batch)  # answer columns
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    logits = model.lm_head(hidden[:, -K - 1 : -1].contiguous()).float()  # (B, K, V): t predicts t+1
    labels = torch.full((len(batch), K), -100, dtype=torch.long)
    for i, (_, a) in enumerate(batch):
        labels[i, K - len(a) :] = torch.tensor(a)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _why(losses: list[float]) -> str:
    """What to change when the loss is non-finite: before the first update the learning rate is not the
    cause (nor, for a fresh adapter, alpha: B starts at zero); after it, the step size is lr × alpha / r."""
    if not losses:
        return "before the first update, so not --lr: check the model, its --dtype and the data"
    return "lower --lr or --alpha (the update scales with lr x alpha / r)"


def train_steps(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    codec: Codec,
    examples: list[tuple[Task, Example]],
    opts: TrainOptions,
    seed: int,
    desc: str = "train",
    after_step: Callable[[], None] | None = None,
    loss_term: Callable[[], torch.Tensor | None] | None = None,
) -> dict:
    """Train ``params`` with AdamW on ``examples`` for ``opts.steps_for(len(examples))`` steps.

    Micro-batches of ``opts.batch_size`` are drawn without replacement from reshuffled passes over
    ``examples`` (``seed``); ``opts.grad_accum`` of them make one optimizer step, each loss scaled by
    ``1 / grad_accum`` so a step's gradient is the mean over its examples (up to the per-micro-batch
    averaging over answer tokens). ``after_step`` runs after every optimizer step (SLAO's strict mode
    projects the A updates there). ``loss_term()``, when it gives a tensor, is added to every
    micro-batch's task loss before the backward (O-LoRA's regulariser): its gradient counts once per
    step, as the micro-batches' losses are averaged.

    Returns:
        ``{"steps", "first_loss", "final_loss"}`` (final: mean of the last 5 steps), of the task loss
        alone (without ``loss_term``: comparable across methods).

    Raises:
        FloatingPointError: when the loss becomes non-finite (names the step).
    """
    rng = random.Random(seed)
    encoded = [encode_example(codec, t, ex, opts.max_length) for t, ex in examples]
    steps = opts.steps_for(len(encoded))
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, opts.warmup_steps)))
    order: list[int] = []
    losses = []
    model.train()
    bar = progress(range(steps), desc)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(opts.grad_accum):
            if len(order) < opts.batch_size:
                perm = list(range(len(encoded)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: opts.batch_size], order[opts.batch_size :]
            loss = answer_loss(model, [encoded[i] for i in idx], codec.pad_id)
            extra = loss_term() if loss_term is not None else None
            total = loss if extra is None else loss + extra
            if not torch.isfinite(total):
                why = _why(losses)
                raise FloatingPointError(f"{desc}: loss is {total.item()} at step {len(losses)}; {why}")
            (total / opts.grad_accum).backward()
            step_loss += loss.item() / opts.grad_accum
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(step_loss)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:])}


@torch.no_grad()
def run_inputs(
    model: nn.Module, codec: Codec, examples: list[tuple[Task, Example]], opts: TrainOptions
) -> None:
    """Run the decoder over every training sequence (prompt and answer, as trained), one at a time so
    that no padding token reaches a layer: what a strategy watching the layers' inputs sees
    (``ContinualStrategy.observe_inputs``)."""
    model.eval()
    for task, ex in examples:
        prompt, answer = encode_example(codec, task, ex, opts.max_length)
        model.model(input_ids=torch.tensor([prompt + answer]))

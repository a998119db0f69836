"""Text ↔ token ids, and the left-padded batches that training and decoding share.

Sequences are left-padded so that every sequence ends at the last column: the answer tokens sit in
the last columns (the loss reads only those), and decoding appends to every row at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbf.experiment.tasks import Example, Task

__all__ = ["Codec", "encode_example", "left_pad", "positions"]


@dataclass
class Codec:
    """Text ↔ token ids. ``Codec.from_tokenizer(hf_tokenizer)``, or any callables (tests use characters)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tok) -> Codec:
        """A Hugging Face tokenizer without special tokens added; pad falls back to eos."""
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(
            encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            eos_id=tok.eos_token_id,
            pad_id=pad,
        )


def encode_example(codec: Codec, task: Task, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids + eos)``; the prompt is cut from the left to ``max_length``."""
    prompt = codec.encode(task.prompt(ex))[-max_length:]
    return prompt, codec.encode(task.target(ex)) + [codec.eos_id]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both ``(B, T)`` int64, ``T`` the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, T)`` that start at 0 on each row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)

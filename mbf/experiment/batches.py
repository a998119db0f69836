"""Text ↔ token ids, and the left-padded batches that training and decoding share.

Sequences are left-padded so that every sequence ends at the last column: the answer tokens sit in
the last columns (the loss reads only those), and decoding appends to every row at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbf.experiment.tasks import Example, Task

__all__ = ["Codec", "encode_answer", "encode_example", "encode_prompt", "left_pad", "positions"]


@dataclass(frozen=True)
class Codec:
    """Text ↔ token ids. ``Codec.from_tokenizer(hf_tokenizer)``, or any callables (tests use characters)."""

    encode: Callable[[str], list[int]]  # text -> ids, no special tokens added
    decode: Callable[[list[int]], str]  # ids -> text, special tokens dropped
    eos_id: int  # ends every answer
    pad_id: int  # fills left-padded rows
    chat: tuple[str, str] | None = None  # the chat template around one user turn; None: plain prompts

    @property
    def prompt_format(self) -> str:
        """``"chat"`` or ``"plain"`` (results.json's ``train.prompt_format``)."""
        return "plain" if self.chat is None else "chat"

    @classmethod
    def from_tokenizer(cls, tok, chat: bool = False) -> Codec:
        """A Hugging Face tokenizer without special tokens added; pad falls back to eos. ``chat``: prompts
        go inside the tokenizer's chat template (one user turn, then the assistant's cue).

        Raises:
            ValueError: with ``chat`` when the tokenizer has no chat template.
        """
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        wrap = None
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError("--prompt-format chat: the model's tokenizer has no chat template")
            mark = "\x00"  # a character no prompt holds: what stands before and after it is the template
            text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
            before, after = text.split(mark)
            wrap = (before, after)
        return cls(
            encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
            eos_id=tok.eos_token_id,
            pad_id=pad,
            chat=wrap,
        )


def encode_answer(codec: Codec, task: Task, output: str) -> list[int]:
    """The ids of the answer ``output`` as the model is trained to give it (no eos): `` {output}`` after a
    plain prompt, ``{output}`` at the start of the assistant's turn with ``codec.chat``."""
    answer = task.target(Example("", output))
    return codec.encode(answer.lstrip() if codec.chat is not None else answer)


def encode_prompt(codec: Codec, task: Task, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(head ids, rest ids)``: the prompt at most ``max_length`` tokens, split where the input starts.

    The head (instruction, options, ``"Input:"``; with ``codec.chat`` the template's user turn opens
    it) is the same for every example of a task: evaluation runs it once per batch and shares its KV
    cache. The instruction, the options and the answer cue are kept whole; a prompt that is too long
    loses the end of its input. Cutting from the left, as a plain ``ids[-max_length:]`` would, removes
    the instruction and the options first: the model then no longer sees what it is asked. The three
    pieces are encoded separately (each piece starts at a word boundary, so this is the whole prompt's
    tokenization up to merges across the boundary), the same way for training and evaluation. With
    ``codec.chat`` the tail closes the user turn with the assistant's cue.

    Raises:
        ValueError: when the head and tail alone exceed ``max_length`` (names the task and the flag).
    """
    head, body, tail = task.prompt_parts(ex)
    if codec.chat is not None:
        head, tail = codec.chat[0] + head, tail + codec.chat[1]
    head, body, tail = (codec.encode(part) for part in (head, body, tail))
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise ValueError(
            f"task {task.name!r}: the instruction, options and answer cue take {len(head) + len(tail)} "
            f"tokens; --max-length {max_length} leaves no room for the input (use at least "
            f"{len(head) + len(tail) + 16})"
        )
    return head, body[:room] + tail


def encode_example(codec: Codec, task: Task, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids + eos)``: ``encode_prompt``'s head and rest joined, and
    ``encode_answer``'s ids of ``ex.output``.

    Raises:
        ValueError: when the head and tail alone exceed ``max_length`` (names the task and the flag).
    """
    head, rest = encode_prompt(codec, task, ex, max_length)
    return head + rest, encode_answer(codec, task, ex.output) + [codec.eos_id]


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

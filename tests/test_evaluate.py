"""Evaluation's scorers on the tiny Llama: the shared head and the length-sorted batches change no
prediction, ranking equals the log-likelihood of each whole prompt + option, and every example's
record says what was predicted, the gold answer and whether it was right."""

import pytest
import torch
from fixtures.tiny import char_codec, tiny_llama

from mbf.experiment.batches import encode_answer, encode_example, encode_prompt
from mbf.experiment.evaluate import _Prompted, _rank, greedy_decode, score_task
from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.tasks import Example, Task
from mbf.experiment.train import TrainOptions


def _task(n_test=7):
    """A classification task whose options differ in length (1 to 6 characters = tokens)."""
    words = ["a", "bb", "cat", "dove", "eagle", "falcon"]
    test = [Example(" ".join(words[(i + k) % 6] for k in range(1 + i % 4)), words[i % 6])
            for i in range(n_test)]  # fmt: skip
    return Task("t", "Which word comes first?", [], test, labels=words)


def _loglik(model, prompt: list[int], option: list[int]) -> float:
    ids = torch.tensor([prompt + option])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(option))


@pytest.mark.parametrize("made", ["labels", "ids"])
def test_rank_is_each_options_loglikelihood_after_the_whole_prompt(made):
    """Each option's summed log-likelihood after the whole prompt, or NaN for one left unfinished because
    its first tokens already score below a finished option of the row; the argmax is brute force's.
    ``ids``: options with distinct first tokens and 1-3 tokens, where that pruning happens."""
    model, codec, task = tiny_llama(3), char_codec(), _task()
    parts = [encode_prompt(codec, task, ex, 128) for ex in task.test[:5]]
    options = [encode_answer(codec, task, w) for w in task.labels]
    if made == "ids":
        options = [[10 + j] + [20 + j] * (j % 3) for j in range(8)]
    state = _Prompted(model, parts[0][0], [r for _, r in parts], codec.pad_id)
    got = _rank(model, state, options)  # (5, L)
    want = torch.tensor([[_loglik(model, h + r, o) for o in options] for h, r in parts])
    scored = ~got.isnan()
    torch.testing.assert_close(got[scored], want[scored], rtol=1e-4, atol=1e-4)
    assert torch.equal(got.nan_to_num(nan=-torch.inf).argmax(-1), want.argmax(-1))
    best = want.max(-1, keepdim=True).values.expand_as(want)
    assert bool((want[~scored] < best[~scored]).all())  # unfinished: could not have won
    assert (~scored).any() == (made == "ids")  # the labels all start with a space: none is pruned
    assert state.cache.get_seq_length() == state.mask.shape[1]  # cropped back after the options


def test_shared_head_and_sorted_batches_change_no_prediction():
    """Generation through the shared head equals decoding each whole prompt alone; batch sizes agree."""
    model, codec, task = tiny_llama(5), char_codec(), _task(n_test=9)
    max_new = len(" falcon") + 1  # one past the longest answer
    prompts = [encode_example(codec, task, ex, 128)[0] for ex in task.test]
    alone = [codec.decode(greedy_decode(model, [p], max_new, codec.eos_id, codec.pad_id)[0]) for p in prompts]
    for bs in (1, 4, 50):
        opts = TrainOptions(eval_batch_size=bs, max_length=128, scoring="both")
        rec = score_task(model, codec, task, opts)
        assert rec["generate"]["pred"] == alone
        assert rec["generate"]["ids"] == list(range(9))
        assert rec["generate"]["gold"] == [e.output for e in task.test]
        scores = torch.tensor(
            [[-torch.inf if x is None else x for x in row] for row in rec["rank"]["option_scores"]]
        )
        assert rec["rank"]["pred"] == [task.labels[j] for j in scores.argmax(-1).tolist()]
        right = [float(p == g) for p, g in zip(rec["rank"]["pred"], rec["rank"]["gold"])]
        assert rec["rank"]["correct"] == right
        assert rec["rank"]["score"] == pytest.approx(sum(rec["rank"]["correct"]) / 9)


def test_scoring_records_no_autograd_graph():
    """Scoring with trainable parameters (the fine-tuned adapter during a run) runs without autograd: no
    layer's forward sees grad enabled, so no activation is kept (a SLAO run's fine-tuned evaluation held
    every prompt pass's activations: 9.7 GB peak against seq-lora's 3.1 GB)."""
    model, codec, task = tiny_llama(3), char_codec(), _task(n_test=5)
    model.requires_grad_(True)
    seen = []
    record = lambda *_: seen.append(torch.is_grad_enabled())  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in model.modules()]
    score_task(model, codec, task, TrainOptions(eval_batch_size=4, max_length=128, scoring="both"))
    for h in hooks:
        h.remove()
    assert seen and not any(seen)
    assert torch.is_grad_enabled()  # restored for the training that follows


def test_rank_needs_options():
    task = conflict_suite(0, n_train=2, n_test=2, n_tasks=1)[0]
    bare = Task(task.name, task.instruction, task.train, task.test)
    with pytest.raises(ValueError, match="--scoring rank: task .* has no answer options"):
        score_task(tiny_llama(), char_codec(), bare, TrainOptions(scoring="rank"))


def test_chat_prompts_wrap_the_template_around_head_and_tail(tmp_path):
    """``--prompt-format chat``: the template's user turn opens the head, the assistant's cue closes the
    tail, the answer starts the assistant's turn without a space; the checkpoint says it has a template."""
    from fixtures.tiny import save_tiny_checkpoint
    from transformers import AutoTokenizer

    from mbf.experiment.batches import Codec
    from mbf.experiment.models import has_chat_template

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    assert not has_chat_template(folder) and has_chat_template(None)  # None: the embedded instruct model
    tok = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="--prompt-format chat: the model's tokenizer has no chat template"):
        Codec.from_tokenizer(tok, chat=True)
    tok.chat_template = "{% for m in messages %}<pad> {{ m['content'] }} </s>{% endfor %}Answer:"
    tok.save_pretrained(folder)
    assert has_chat_template(folder)
    codec = Codec.from_tokenizer(tok, chat=True)
    assert codec.chat == ("<pad> ", " </s>Answer:") and codec.prompt_format == "chat"
    task = conflict_suite(0, n_train=2, n_test=1, n_tasks=1)[0]
    ex = task.test[0]
    prompt, answer = encode_example(codec, task, ex, 64)
    plain = Codec.from_tokenizer(tok)
    assert prompt == plain.encode("<pad> " + task.prompt(ex) + " </s>Answer:")
    assert answer == plain.encode(ex.output) + [plain.eos_id]

"""Evaluation throughput (examples/s) of the embedded SmolLM2-135M-Instruct on the real suite's test
examples: the generation loop as it was before issue 21 (whole prompts in file order, batches of 50),
and ``score_task``'s generation, ranking and both (prompts batched by length, the task's head run once
per batch). A benchmark: it measures and prints, it asserts nothing.

    usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python reports/eval_speed.py [--threads 2] [--n-test 50]
           [--max-length 96] [--prompt-format plain]
"""

from __future__ import annotations

import argparse
import time

import torch

from mbf.experiment.batches import Codec, encode_answer, encode_example
from mbf.experiment.evaluate import greedy_decode, score_task
from mbf.experiment.metrics import answer_score
from mbf.experiment.models import load_model
from mbf.experiment.suites import load_suite
from mbf.experiment.train import TrainOptions


def before(model, codec: Codec, task, opts: TrainOptions) -> float:
    """The evaluation loop before issue 21: whole prompts, in file order; returns the mean score."""
    prompts = [encode_example(codec, task, ex, opts.max_length)[0] for ex in task.test]
    max_new = max(len(encode_answer(codec, task, ex.output)) for ex in task.test) + 1
    total, bs = 0.0, opts.eval_batch_size
    for s in range(0, len(prompts), bs):
        outs = greedy_decode(model, prompts[s : s + bs], max_new, codec.eos_id, codec.pad_id)
        total += sum(
            answer_score("exact", codec.decode(o), ex.output) for o, ex in zip(outs, task.test[s : s + bs])
        )
    return total / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    ap.add_argument("--order", default="std1")
    ap.add_argument("--scorers", default="generate,rank,both", help="the rows after 'generate, before'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None, dtype="float32")
    codec = Codec.from_tokenizer(tok, chat=args.prompt_format == "chat")
    tasks, _ = load_suite("real", n_train=1, n_test=args.n_test, order=args.order)
    n = sum(len(t.test) for t in tasks)
    names = ", ".join(t.name for t in tasks)
    print(f"{n} test examples ({args.order}: {names}), --max-length {args.max_length}, "
          f"{args.prompt_format} prompts, {args.threads} threads, float32")  # fmt: skip
    rows = [("generate, before", lambda t, o: before(model, codec, t, o), "generate")]
    for scoring in args.scorers.split(","):
        rows.append((f"{scoring}, after", lambda t, o: score_task(model, codec, t, o), scoring))
    # interleaved, task by task, so that a change in the machine's load falls on every row alike
    seconds, scores = {name: 0.0 for name, _, _ in rows}, {name: [] for name, _, _ in rows}
    for t in tasks:
        for name, fn, scoring in rows:
            opts = TrainOptions(max_length=args.max_length, scoring=scoring, prompt_format=args.prompt_format)
            t0 = time.perf_counter()
            with torch.no_grad():
                s = fn(t, opts)
            seconds[name] += time.perf_counter() - t0
            text = f"{s:.2f}" if isinstance(s, float) else "/".join(f"{r['score']:.2f}" for r in s.values())
            scores[name].append(text)
    base = n / seconds[rows[0][0]]
    for name, _, _ in rows:
        rate = n / seconds[name]
        print(f"{name:18s} {rate:6.2f} examples/s  ({rate / base:.2f}x) {seconds[name]:6.1f} s", scores[name])


if __name__ == "__main__":
    main()

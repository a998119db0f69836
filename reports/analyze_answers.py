"""Why does an adapter forget? Classify its answers on earlier tasks by the rule they follow.

For each finished run given, the final adapter (merged: what inference uses) answers every task's
test set; each answer is put in one class: correct, the answer the *last* task's rule would give on
that input, the answer of another task's rule, another word of the input, or something else.
A model that "answers the latest question whatever it is asked" scores high in the second class.

    python reports/analyze_answers.py reports/sweep/run/seq-lora-s0 reports/sweep/run/slao-s0 > out.md
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from mbf.continual import ContinualLoRA
from mbf.experiment.batches import Codec, encode_example
from mbf.experiment.evaluate import greedy_decode
from mbf.experiment.models import load_model
from mbf.experiment.results import read as read_results
from mbf.experiment.suites.conflict import ANIMALS, BUILTIN_TASKS, COLORS, FRUITS, OBJECTS
from mbf.experiment.suites.conflict import conflict_suite as builtin_suite

CATS = {
    **{w: "animal" for w in ANIMALS},
    **{w: "color" for w in COLORS},
    **{w: "fruit" for w in FRUITS},
    **{w: "object" for w in OBJECTS},
}
RULES = {name: rule for name, _, rule in BUILTIN_TASKS}


def rule_answer(task: str, text: str) -> str:
    words = text.split()
    return RULES[task](words, [CATS[w] for w in words])


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    print(
        "| run | evaluated on | correct | = last task's rule | = another task's rule "
        "| other input word | other |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        res = read_results(run)
        if not res["complete"] or not res.get("checkpoint"):
            continue
        tasks = builtin_suite(res["suite_seed"], n_train=res["n_train"], n_test=res["n_test"])
        model, tok = load_model()
        codec = Codec.from_tokenizer(tok)
        cl = ContinualLoRA.load(model, Path(run) / res["checkpoint"])
        last = tasks[-1].name
        with cl.merged():
            for task in tasks[:-1]:
                prompts = [encode_example(codec, task, ex, 256)[0] for ex in task.test]
                outs = []
                for s in range(0, len(prompts), 50):
                    outs += greedy_decode(model, prompts[s : s + 50], 3, codec.eos_id, codec.pad_id)
                c: Counter = Counter()
                for ex, o in zip(task.test, outs):
                    pred = codec.decode(o).strip()
                    others = {rule_answer(t.name, ex.input) for t in tasks if t.name not in (task.name, last)}
                    if pred == ex.output:
                        c["correct"] += 1
                    elif pred == rule_answer(last, ex.input):
                        c["last"] += 1
                    elif pred in others:
                        c["another"] += 1
                    elif pred in ex.input.split():
                        c["word"] += 1
                    else:
                        c["other"] += 1
                n = len(task.test)
                print(
                    f"| {Path(run).name} | {task.name} | "
                    + " | ".join(
                        f"{100 * c[k] / n:.0f}%" for k in ("correct", "last", "another", "word", "other")
                    )
                    + " |"
                )


if __name__ == "__main__":
    main(sys.argv[1:])

"""The conflict suite (formerly "built-in"): five generated tasks that conflict by construction.

The tasks share one input format — four words, one animal, one color, one fruit and one object,
shuffled — and one answer space (a word of the input), and each asks for a different word: the
color, the first word, the animal, the last word, the fruit. Every task is easy for a 135M Llama
alone, but the tasks interfere directly: the adapter that learned "answer the fruit" answers the
fruit to the color question, so sequential LoRA forgets, while a model that reads the instruction
can solve all five (the multi-task upper bound). It is the worst case for any merging method: a stress
test, not the paper's regime (``domains`` and ``real`` are). Deterministic from ``seed``; all words are
single tokens in SmolLM2's vocabulary.
"""

from __future__ import annotations

import random

from mbf.experiment.tasks import Example, Task

__all__ = ["ANIMALS", "BUILTIN_TASKS", "COLORS", "FRUITS", "OBJECTS", "conflict_suite"]

# -- the words and the five rules ------------------------------------------------------------------

# single tokens (with the leading space) in SmolLM2's tokenizer; checked by tests/test_tasks.py
ANIMALS = ("cat", "dog", "horse", "cow", "sheep", "pig", "goat", "mouse", "lion", "tiger", "bear", "wolf")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "grey")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum")
OBJECTS = ("table", "chair", "spoon", "knife", "cup", "lamp", "door", "bed", "shoe", "hat", "box", "pen")

# every input is one word of each kind in one of 4! orders: 342,144 distinct inputs
DISTINCT_INPUTS = len(ANIMALS) * len(COLORS) * len(FRUITS) * len(OBJECTS) * 24

# (name, instruction, which word of the shuffled (animal, color, fruit, object) list is the answer)
BUILTIN_TASKS = (
    ("color", "Which word is a color?", lambda words, cats: words[cats.index("color")]),
    ("first", "Which word comes first?", lambda words, cats: words[0]),
    ("animal", "Which word is an animal?", lambda words, cats: words[cats.index("animal")]),
    ("last", "Which word comes last?", lambda words, cats: words[-1]),
    ("fruit", "Which word is a fruit?", lambda words, cats: words[cats.index("fruit")]),
)


def _draw(rng: random.Random) -> tuple[list[str], list[str]]:
    pairs = [
        (rng.choice(ANIMALS), "animal"),
        (rng.choice(COLORS), "color"),
        (rng.choice(FRUITS), "fruit"),
        (rng.choice(OBJECTS), "object"),
    ]
    rng.shuffle(pairs)
    return [w for w, _ in pairs], [c for _, c in pairs]


def conflict_suite(seed: int = 0, n_train: int = 300, n_test: int = 100, n_tasks: int = 5) -> list[Task]:
    """The conflict suite: ``n_tasks`` (≤ 5) generated tasks in their fixed order.

    Test inputs never occur in the same task's training set. Same seed, same suite.

    Raises:
        ValueError: on ``n_tasks`` outside ``[1, 5]``, non-positive sizes, or more examples than the
            suite has distinct inputs.
    """
    if not 1 <= n_tasks <= len(BUILTIN_TASKS):
        raise ValueError(f"n_tasks={n_tasks} must be in [1, {len(BUILTIN_TASKS)}]")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must be positive")
    if n_train + n_test > DISTINCT_INPUTS:  # train never repeats an input nor uses a test one: no end
        raise ValueError(
            f"n_train={n_train} + n_test={n_test} is more than the conflict suite's {DISTINCT_INPUTS:,} "
            "distinct inputs"
        )
    tasks = []
    for t, (name, instruction, answer) in enumerate(BUILTIN_TASKS[:n_tasks]):
        # str seeds hash deterministically; the suite's old name keeps committed runs reproducible
        rng = random.Random(f"mbf-builtin-{seed}-{t}")
        seen: set[str] = set()
        splits: list[list[Example]] = [[], []]
        for split, n in ((1, n_test), (0, n_train)):  # test first, so train can avoid its inputs
            while len(splits[split]) < n:
                words, cats = _draw(rng)
                text = " ".join(words)
                if split == 0 and text in seen:
                    continue
                seen.add(text)
                splits[split].append(Example(text, answer(words, cats)))
        tasks.append(Task(name, instruction, train=splits[0], test=splits[1]))
    return tasks

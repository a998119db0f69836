"""The generated domains suite: the paper's regime (distinct input domains, distinct answers) offline.

Five templated tasks, each with its own input domain and answer vocabulary, as O-LoRA's benchmarks
have (topic, sentiment, NLI, ...) but generated from a seed, so it needs nothing installed and runs in
minutes: the fast check of a method. In order:

- ``news``: the topic of a templated news sentence (sports, politics, science, business);
- ``review``: the sentiment of a templated product review (positive, negative);
- ``arithmetic``: the sum or difference of two numbers (the number);
- ``dates``: an ISO date rewritten as ``5 March 2024`` (a generation task, scored by Rouge-L);
- ``entailment``: whether a templated hypothesis follows from a premise (entailment, contradiction,
  neutral).

Test inputs never occur in the same task's training set. Same seed, same suite.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mbf.experiment.tasks import Example, Task

__all__ = ["DOMAIN_TASKS", "domains_suite"]

NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kofi", "Lena")
CITIES = ("Lyon", "Boston", "Osaka", "Madrid", "Nairobi", "Oslo", "Perth", "Quito", "Seoul", "Turin")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip

_NEWS = {
    "sports": ("The {city} team beat its rivals {n} to {m} on {day}.",
               "{name} won the {city} marathon on {day}.",
               "The coach of the {city} club praised the goalkeeper after the match."),
    "politics": ("The {city} council voted on a new housing law on {day}.",
                 "Minister {name} resigned after the budget debate in parliament.",
                 "Voters in {city} elect a new mayor this {day}."),
    "science": ("Researchers in {city} found a new species of frog near the river.",
                "A telescope study led by {name} measured the age of a distant star.",
                "Chemists in {city} made a battery that lasts {n} times longer."),
    "business": ("Shares of a {city} bank rose {n} percent on {day}.",
                 "{name} sold the family bakery to a food company for {n} million.",
                 "The {city} factory will hire {n} hundred workers next year."),
}  # fmt: skip
_PRODUCTS = ("blender", "lamp", "backpack", "kettle", "phone case", "desk chair", "umbrella", "toaster")
_GOOD = ("works perfectly", "is sturdy and well made", "was worth every penny", "exceeded my expectations")
_BAD = ("broke after a week", "feels cheap and flimsy", "was a waste of money", "stopped working quickly")


def _news(rng: random.Random) -> Example:
    topic = rng.choice(sorted(_NEWS))
    slots = dict(city=rng.choice(CITIES), name=rng.choice(NAMES), day=rng.choice(DAYS),
                 n=rng.randint(2, 9), m=rng.randint(0, 1))  # fmt: skip
    return Example(rng.choice(_NEWS[topic]).format(**slots), topic)


def _review(rng: random.Random) -> Example:
    good = rng.random() < 0.5
    phrase = rng.choice(_GOOD if good else _BAD)
    text = f"I bought this {rng.choice(_PRODUCTS)} {rng.randint(2, 11)} weeks ago and it {phrase}."
    if rng.random() < 0.5:
        text += f" {'I would buy it again.' if good else 'I would not buy it again.'}"
    return Example(text, "positive" if good else "negative")


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(1, 49)
    if rng.random() < 0.5:
        return Example(f"What is {a} plus {b}?", str(a + b))
    return Example(f"What is {a} minus {b}?", str(a - b))


def _dates(rng: random.Random) -> Example:
    y, mo, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return Example(f"{y:04d}-{mo:02d}-{d:02d}", f"{d} {MONTHS[mo - 1]} {y}")


def _entailment(rng: random.Random) -> Example:
    name, n, city = rng.choice(NAMES), rng.randint(2, 6), rng.choice(CITIES)
    other = rng.choice([c for c in CITIES if c != city])
    premise = f"{name} lives in {city} and owns {n} bicycles."
    kind = rng.randrange(3)
    hypothesis = (
        (f"{name} owns more than one bicycle.", f"{name} lives in {city}.")[rng.randrange(2)],
        (f"{name} owns no bicycle.", f"{name} lives in {other}.")[rng.randrange(2)],
        (f"{name} likes to swim.", f"{name} has a sister in {other}.")[rng.randrange(2)],
    )[kind]
    return Example(
        f"Premise: {premise} Hypothesis: {hypothesis}", ("entailment", "contradiction", "neutral")[kind]
    )


# (name, instruction, options, metric, generator)
DOMAIN_TASKS: tuple[tuple[str, str, tuple[str, ...], str, Callable[[random.Random], Example]], ...] = (
    ("news", "What is the topic of the following news? Choose one from the option.",
     tuple(sorted(_NEWS)), "exact", _news),
    ("review", "What is the sentiment of the following review? Choose one from the option.",
     ("negative", "positive"), "exact", _review),
    ("arithmetic", "Compute the answer.", (), "exact", _arithmetic),
    ("dates", "Rewrite the date as day, month name and year.", (), "rougeL", _dates),
    ("entailment", "Does the hypothesis follow from the premise? Choose one from the option.",
     ("entailment", "contradiction", "neutral"), "exact", _entailment),
)  # fmt: skip


def domains_suite(seed: int = 0, n_train: int = 300, n_test: int = 100) -> list[Task]:
    """The five domain tasks in their fixed order, ``n_train`` / ``n_test`` examples each.

    Raises:
        ValueError: on non-positive sizes.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must be positive")
    tasks = []
    for name, instruction, labels, metric, draw in DOMAIN_TASKS:
        rng = random.Random(f"mbf-domains-{seed}-{name}")
        test = [draw(rng) for _ in range(n_test)]
        seen = {ex.input for ex in test}
        train: list[Example] = []
        for _ in range(50 * n_train):  # bounded: a small template space may hold fewer unseen inputs
            if len(train) == n_train:
                break
            ex = draw(rng)
            if ex.input not in seen:
                train.append(ex)
        tasks.append(
            Task(name, instruction, train, test, labels=list(labels), metric=metric, source="generated")
        )
    return tasks

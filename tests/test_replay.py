"""Experience replay's buffer: reservoir sampling (size, determinism by seed, uniformity) and persistence."""

import json
import random
from collections import Counter

import pytest

from mbf.experiment.replay import FILE, ReplayBuffer, buffer_size, reservoir_sample
from mbf.experiment.tasks import Example, Task


def _task(name, n):
    return Task(
        name, f"do {name}", [Example(f"{name} in {i}", f"out {i}") for i in range(n)], [Example("t", "t")]
    )


def test_reservoir_size_and_distinct_items():
    got = reservoir_sample(range(1000), 37, random.Random(0))
    assert len(got) == 37 and len(set(got)) == 37 and all(0 <= x < 1000 for x in got)
    assert sorted(reservoir_sample(range(5), 9, random.Random(0))) == [0, 1, 2, 3, 4]  # a short stream: all
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        reservoir_sample(range(3), 0, random.Random(0))


def test_reservoir_is_determined_by_the_seed():
    draw = lambda seed: reservoir_sample(range(500), 10, random.Random(seed))  # noqa: E731
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_reservoir_is_uniform_over_a_long_stream():
    """20 000 draws of 10 from 100: each item is kept 2 000 times in expectation (sd ~42 for the binomial
    with p = 0.1); every count within 6 sd, and the first and last tenths of the stream kept equally often
    (a sampler biased toward either end, e.g. keeping the first k, fails both)."""
    n, k, rounds = 100, 10, 20_000
    rng = random.Random(12345)
    counts = Counter(x for _ in range(rounds) for x in reservoir_sample(range(n), k, rng))
    expected = rounds * k / n
    sd = (rounds * (k / n) * (1 - k / n)) ** 0.5
    assert all(abs(counts[x] - expected) < 6 * sd for x in range(n)), counts.most_common(3)
    first, last = sum(counts[x] for x in range(10)), sum(counts[x] for x in range(90, 100))
    assert abs(first - last) < 6 * (2 * 10 * sd**2) ** 0.5


def test_buffer_size_is_two_percent_and_at_least_one():
    assert buffer_size(1000, 0.02) == 20
    assert buffer_size(30, 0.02) == 1
    assert buffer_size(7, 0.5) == 4  # round half to even: 3.5 -> 4


def test_the_buffer_of_a_task_is_seeded_by_run_seed_and_task():
    a, b = _task("a", 300), _task("b", 300)
    one, two = ReplayBuffer(seed=1), ReplayBuffer(seed=1)
    one.add(a)
    one.add(b)
    two.add(b)  # another order of additions draws each task's buffer the same way
    two.add(a)
    assert one.kept["a"] == two.kept["a"] and one.kept["b"] == two.kept["b"]
    assert len(one.kept["a"]) == 6 and set(one.kept["a"]) <= set(a.train)
    assert ReplayBuffer(seed=2).add(a) != one.kept["a"]
    assert [ex for _, ex in one.examples([a, b])] == one.kept["a"] + one.kept["b"]
    assert all(t is a for t, _ in one.examples([a, b])[:6])
    assert one.nbytes() == sum(len(e.input) + len(e.output) for e in one.kept["a"] + one.kept["b"])
    with pytest.raises(KeyError, match="task 'b', which is not in this run's tasks"):
        one.examples([a])


def test_the_buffer_round_trips_and_a_modified_file_is_refused(tmp_path):
    buf = ReplayBuffer(fraction=0.05, seed=7)
    buf.add(_task("a", 100))
    buf.add(_task("b", 41))
    buf.save(tmp_path)
    back = ReplayBuffer.load(tmp_path)
    assert back == buf
    data = json.loads((tmp_path / FILE).read_text())
    data["kept"]["a"][0][1] = "tampered"
    (tmp_path / FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ReplayBuffer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="replay buffer of this checkpoint is missing"):
        ReplayBuffer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--replay-fraction 0 must be in"):
        ReplayBuffer(fraction=0)

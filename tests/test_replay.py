"""Experience replay: reservoir sampling (size, determinism by seed, uniformity), the per-task buffer and
its mixing into later tasks' training examples, and the buffer in the checkpoint."""

import random
from collections import Counter

import pytest
import torch

import mbf
from mbf.strategies.replay import (
    ExperienceReplay,
    Replay,
    ReplayConfig,
    buffer_size,
    draw_buffer,
    reservoir_sample,
)


def test_reservoir_size_and_distinct_items():
    got = reservoir_sample(range(1000), 37, random.Random(0))
    assert len(got) == 37 and len(set(got)) == 37 and all(0 <= x < 1000 for x in got)
    assert sorted(reservoir_sample(range(5), 9, random.Random(0))) == [0, 1, 2, 3, 4]  # a short stream: all
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        reservoir_sample(range(3), 0, random.Random(0))


def test_reservoir_is_determined_by_the_seed():
    def draw(seed):
        return reservoir_sample(range(500), 10, random.Random(seed))

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


def test_a_tasks_buffer_is_seeded_by_the_config_seed_and_its_position():
    cfg = ReplayConfig(seed=1)
    assert draw_buffer(300, 0, cfg) == draw_buffer(300, 0, cfg)
    assert len(draw_buffer(300, 0, cfg)) == 6
    assert draw_buffer(300, 0, cfg) != draw_buffer(300, 1, cfg)
    assert draw_buffer(300, 0, cfg) != draw_buffer(300, 0, ReplayConfig(seed=2))


def _strategy(model):
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    return ExperienceReplay(model, ReplayConfig(fraction=0.1, seed=3))


def _tasks(sizes):
    return [[f"task{t}-ex{i}" for i in range(n)] for t, n in enumerate(sizes)]


def test_later_tasks_train_on_their_examples_plus_every_earlier_buffer(tiny_llama):
    cl = _strategy(tiny_llama)
    data = _tasks([50, 30, 20])
    first = cl.training_examples(0, data[:1])
    assert first == data[0]  # nothing to replay yet
    cl.begin_task()
    cl.end_task()
    kept0 = [data[0][k] for k in draw_buffer(50, 0, cl.config)]
    assert len(kept0) == 5 and cl.buffered() == kept0
    second = cl.training_examples(1, data[:2])
    assert second == data[1] + kept0  # the task's own examples, then the buffer
    cl.begin_task()
    cl.end_task()
    kept1 = [data[1][k] for k in draw_buffer(30, 1, cl.config)]
    third = cl.training_examples(2, data)
    assert third == data[2] + kept0 + kept1 and len(kept1) == 3
    assert cl.buffered() == kept0 + kept1 + [data[2][k] for k in draw_buffer(20, 2, cl.config)]


def test_replay_trains_sequential_lora(tiny_llama):
    cl = _strategy(tiny_llama)
    layer = next(iter(cl.layers.values()))
    cl.training_examples(0, _tasks([10]))
    cl.begin_task()
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    cl.end_task()
    carried = layer.lora_B.detach().clone()
    cl.training_examples(1, _tasks([10, 10]))
    cl.begin_task()  # the adapter carries on (no re-init, no QR)
    assert torch.equal(layer.lora_B, carried)
    assert torch.equal(layer.merged_B, carried)  # λ ≡ 1: the merged adapter is the fine-tuned one
    assert not cl.finetuned_differs


def test_errors(tiny_llama):
    with pytest.raises(ValueError, match="fraction=0 must be in"):
        ReplayConfig(fraction=0)
    cl = _strategy(tiny_llama)
    with pytest.raises(ValueError, match="the next task is 0"):
        cl.training_examples(1, _tasks([5, 5]))
    cl.begin_task()
    with pytest.raises(RuntimeError, match="call training_examples"):
        cl.end_task()
    cl.training_examples(0, _tasks([50]))
    cl.end_task()
    with pytest.raises(
        ValueError, match="task 1's saved buffer holds example .* has 3 training examples now"
    ):
        cl.training_examples(1, [["a", "b", "c"], ["d"]])


def test_replays_seed_is_the_runs_and_an_option_that_sets_it_is_refused():
    from mbf.experiment.methods import method_config

    with pytest.raises(ValueError, match="--option seed=3: replay's seed is the run's; give --seed 3"):
        method_config("replay", options={"seed": "3"})


def test_replay_is_a_plugin_that_composes_with_slao(tmp_path):
    """``Replay(strategy)``: the strategy's boundaries and adapters unchanged (SLAO's merge), plus the
    buffers, driven as ``mbf continual``'s loop drives it; saved beside the strategy's checkpoint and read
    back."""
    from conftest import fake_training, make_tiny_llama

    def slao(model):
        mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
        return mbf.ContinualLoRA(model, backend="torch")

    plain = slao(make_tiny_llama())
    cl = Replay(slao(make_tiny_llama()), ReplayConfig(fraction=0.1, seed=3))
    assert cl.strategy_name == "slao+replay" and cl.finetuned_differs and not cl.wants_inputs
    data = _tasks([50, 30])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i in range(2):
        examples = cl.training_examples(i, data[: i + 1])
        assert examples == data[i] + [
            data[t][k] for t in range(i) for k in draw_buffer(len(data[t]), t, cl.config)
        ]
        for strategy, g in ((plain, g1), (cl, g2)):
            strategy.begin_task()
            fake_training(strategy, g)
            strategy.end_task()
    assert cl.task_index == 2 and cl.kept == [draw_buffer(50, 0, cl.config), draw_buffer(30, 1, cl.config)]
    for a, b in zip(plain.layers.values(), cl.layers.values()):
        assert torch.equal(a.merged_B, b.merged_B) and torch.equal(a.merged_A, b.merged_A)  # SLAO's merge
    cl.save(tmp_path / "ckpt")
    back = Replay.load(make_tiny_llama(), tmp_path / "ckpt")
    assert back.kept == cl.kept and back.task_index == 2 and back.strategy_name == "slao+replay"
    in_place = Replay(slao(make_tiny_llama()), ReplayConfig(fraction=0.1, seed=3))
    in_place.restore(tmp_path / "ckpt")
    assert in_place.kept == cl.kept and in_place.task_index == 2
    with pytest.raises(ValueError, match="saved with .* but this replay runs"):
        Replay(slao(make_tiny_llama()), ReplayConfig(fraction=0.2, seed=3)).restore(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "replay.json").unlink()
    with pytest.raises(FileNotFoundError, match="replay.json: missing"):
        Replay.load(make_tiny_llama(), tmp_path / "ckpt")

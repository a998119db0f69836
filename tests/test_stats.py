"""Paired bootstrap intervals on hand-made data, and ``paired.compare_intervals`` on hand-written runs."""

import json

import numpy as np
import pytest

from mbf.experiment import predictions
from mbf.experiment.paired import compare_intervals
from mbf.experiment.stats import paired_bootstrap


def mean_of(key):
    return lambda means: np.mean([m[key] for m in means.values()], axis=0)


def diff(means):
    return np.mean([m["a"] - m["b"] for m in means.values()], axis=0)


def test_identical_methods_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, 300).astype(float)
    iv = paired_bootstrap([{"t": {"a": x, "b": x.copy()}}], diff)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.significant


def test_always_right_against_always_wrong_is_one_exactly():
    iv = paired_bootstrap([{"t": {"a": np.ones(50), "b": np.zeros(50)}}], diff)
    assert (iv.estimate, iv.low, iv.high) == (1.0, 1.0, 1.0) and iv.significant


def test_one_proportion_matches_the_normal_approximation():
    """400 examples, 240 right: the 95% interval is p ± 1.96 √(p(1-p)/n) up to bootstrap noise."""
    x = np.array([1.0] * 240 + [0.0] * 160)
    iv = paired_bootstrap([{"t": {"a": x}}], mean_of("a"), n_boot=4000)
    half = 1.96 * np.sqrt(0.6 * 0.4 / 400)
    assert iv.estimate == pytest.approx(0.6)
    assert iv.low == pytest.approx(0.6 - half, abs=0.008) and iv.high == pytest.approx(0.6 + half, abs=0.008)


def test_pairing_removes_the_shared_difficulty():
    """B is A with 20 of 400 answers flipped to wrong: paired, the difference 0.05 is significant and
    narrow; the same scores unpaired (B's examples shuffled) would be within noise."""
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0.0
    iv = paired_bootstrap([{"t": {"a": a, "b": b}}], diff)
    assert iv.estimate == pytest.approx(0.05) and iv.significant
    assert iv.high - iv.low < 0.05  # unpaired, the interval's width would be ~0.14
    assert 0.02 < iv.low < 0.05 < iv.high < 0.08


def test_units_are_resampled_too():
    """No example noise (constant scores), two units with differences 0.2 and 0.4: the estimate is
    their mean and the interval spans what drawing the units gives, [0.2, 0.4]."""
    units = [
        {"t": {"a": np.full(10, 0.2), "b": np.zeros(10)}},
        {"t": {"a": np.full(10, 0.4), "b": np.zeros(10)}},
    ]
    iv = paired_bootstrap(units, diff)
    assert (
        iv.estimate == pytest.approx(0.3) and iv.low == pytest.approx(0.2) and iv.high == pytest.approx(0.4)
    )


def test_the_same_seed_gives_the_same_interval_and_unpaired_arrays_are_refused():
    x = np.random.default_rng(3).random(100)
    assert paired_bootstrap([{"t": {"a": x}}], mean_of("a"), seed=5) == paired_bootstrap(
        [{"t": {"a": x}}], mean_of("a"), seed=5
    )
    with pytest.raises(ValueError, match="task 't': paired arrays need one common"):
        paired_bootstrap([{"t": {"a": np.ones(3), "b": np.ones(4)}}], diff)
    with pytest.raises(ValueError, match="no units"):
        paired_bootstrap([], diff)


def _run(folder, method, seed, stages, zero):
    """A 2-task run directory written by hand: ``stages[i][task]`` the per-example correctness."""
    tasks = ["x", "y"]
    acc = [[float(np.mean(s[t])) for t in tasks if t in s] for s in stages]
    results = {
        "method": method,
        "seed": seed,
        "tasks": tasks,
        "stages": tasks[: len(stages)],
        "accuracy": acc,
        "zero_shot": [float(np.mean(zero[t])) for t in tasks],
        "data_fingerprint": "d",
        "train": {},
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    predictions.write(folder, 0, "zero-shot", [{"task": t, "scorer": "generate", "adapter": "none",
                                               "correct": zero[t], "score": float(np.mean(zero[t]))}
                                              for t in tasks])  # fmt: skip
    for i, s in enumerate(stages):
        evals = [{"task": t, "scorer": "generate", "adapter": "merged", "correct": c,
                  "score": float(np.mean(c))} for t, c in s.items()]  # fmt: skip
        predictions.write(folder, i + 1, tasks[i], evals)
    return folder, results


def test_compare_intervals_pairs_methods_on_the_same_seed_and_examples(tmp_path):
    zero = {"x": [0.0] * 4, "y": [0.0, 0.0, 0.0, 1.0]}
    # seq forgets x completely; slao keeps it: per-example, exactly +1 on x and 0 on y
    seq = _run(
        tmp_path / "seq",
        "seq-lora",
        0,
        [{"x": [1.0] * 4, "y": [1.0] * 4}, {"x": [0.0] * 4, "y": [1.0] * 4}],
        zero,
    )
    slao = _run(
        tmp_path / "slao",
        "slao",
        0,
        [{"x": [1.0] * 4, "y": [1.0] * 4}, {"x": [1.0] * 4, "y": [1.0] * 4}],
        zero,
    )
    iv = compare_intervals({"seq-lora": [seq], "slao": [slao]}, "seq-lora")
    assert iv["baseline"] == "seq-lora" and iv["missing"] == []
    m = iv["methods"]["seq-lora"]
    assert (m["AA"].estimate, m["BWT"].estimate, m["LA"].estimate) == (0.5, -1.0, 1.0)
    assert m["FWT"].estimate == pytest.approx(0.75)  # y before training (1.0) minus the bare model (0.25)
    d = iv["vs_baseline"]["slao"]
    assert (d["AA"].estimate, d["AA"].low, d["AA"].high) == (0.5, 0.5, 0.5) and d["AA"].significant
    assert (d["BWT"].estimate, d["BWT"].low, d["BWT"].high) == (1.0, 1.0, 1.0)
    assert d["FWT"].estimate == 0.0 and not d["FWT"].significant
    assert d["tasks"]["y"].estimate == 0.0 and d["tasks"]["x"].estimate == 1.0
    # a run without predictions (older) is named, not paired
    old = tmp_path / "old"
    old.mkdir()
    iv = compare_intervals({"seq-lora": [seq], "old": [(old, {**slao[1], "method": "old"})]}, "seq-lora")
    assert iv["missing"] == ["old"] and iv["vs_baseline"] == {}


def test_compare_intervals_pairs_each_seed_with_its_own_seed(tmp_path):
    """Two seeds per method and a third only the baseline ran: a unit is one (order, seed), so the
    baseline has 3 units, slao 2, and the difference pairs seed with seed on the 2 both ran. By hand,
    with x learnt perfectly first (diagonal 1) and final scores per seed:

        seed   seq-lora x, y (AA)     slao x, y (AA)
        0      0,    1    (0.5)       1,    1    (1.0)
        1      0.25, 1    (0.625)     0.5,  0.75 (0.625)
        2      0.5,  1    (0.75)      -

    seq-lora AA (0.5 + 0.625 + 0.75) / 3 = 0.625, BWT (-1 - 0.75 - 0.5) / 3 = -0.75; slao AA 0.8125,
    BWT (0 - 0.5) / 2 = -0.25; slao - seq-lora on seeds 0 and 1: AA (0.5 + 0) / 2 = 0.25, BWT
    (1 + 0.25) / 2 = 0.625, x (1 + 0.25) / 2 = 0.625, y (0 - 0.25) / 2 = -0.125. Pairing on anything
    coarser than the seed (the order and data alone) would collapse each method to one unit."""
    zero = {"x": [0.0] * 4, "y": [0.0, 0.0, 0.0, 1.0]}
    first = {"x": [1.0] * 4, "y": [1.0] * 4}  # after task x: x learnt, y already right (FWT 0.75)
    finals = {
        "seq-lora": {0: ([0, 0, 0, 0], [1, 1, 1, 1]),
                     1: ([1, 0, 0, 0], [1, 1, 1, 1]),
                     2: ([1, 1, 0, 0], [1, 1, 1, 1])},
        "slao": {0: ([1, 1, 1, 1], [1, 1, 1, 1]),
                 1: ([1, 1, 0, 0], [1, 1, 1, 0])},
    }  # fmt: skip
    groups = {
        method: [
            _run(tmp_path / f"{method}-{seed}", method, seed, [first, {"x": x, "y": y}], zero)
            for seed, (x, y) in runs.items()
        ]
        for method, runs in finals.items()
    }
    iv = compare_intervals(groups, "seq-lora")
    seq, slao, d = iv["methods"]["seq-lora"], iv["methods"]["slao"], iv["vs_baseline"]["slao"]
    assert (seq["units"], slao["units"], d["units"]) == (3, 2, 2)
    assert seq["AA"].estimate == pytest.approx(0.625) and seq["BWT"].estimate == pytest.approx(-0.75)
    assert slao["AA"].estimate == pytest.approx(0.8125) and slao["BWT"].estimate == pytest.approx(-0.25)
    assert d["AA"].estimate == pytest.approx(0.25) and d["BWT"].estimate == pytest.approx(0.625)
    assert d["tasks"]["x"].estimate == pytest.approx(0.625)
    assert d["tasks"]["y"].estimate == pytest.approx(-0.125)
    assert d["FWT"].estimate == 0.0  # the same first stage on every seed
    assert d["LA"].estimate == pytest.approx(-0.0625)  # y's diagonal is its final score: (0 - 0.25 / 2) / 2
    for name in ("AA", "BWT"):
        assert d[name].low <= d[name].estimate <= d[name].high
    assert d["AA"].high == 0.5  # seed 0's difference has no example noise: 0.5 whatever the draw

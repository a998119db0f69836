"""The training loop, evaluation and a continual run, on a tiny random Llama with a character tokenizer."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.tiny import char_codec, tiny_llama  # noqa: E402

import mbf  # noqa: E402
from mbf.report import compare_runs, read_results  # noqa: E402
from mbf.tasks import Example, Task, builtin_suite  # noqa: E402
from mbf.train import (  # noqa: E402
    METHODS,
    TrainOptions,
    answer_loss,
    encode_example,
    evaluate,
    greedy_decode,
    method_options,
    run_continual,
    train_steps,
)

LORA = mbf.LoRAConfig(r=4, alpha=8)


def small_suite(n_tasks=3, n_train=16, n_test=6):
    return builtin_suite(0, n_train=n_train, n_test=n_test, n_tasks=n_tasks)


def test_loss_covers_answer_tokens_only():
    """Changing the prompt's last token changes the loss; the loss equals a hand-computed CE on the answer."""
    model, codec = tiny_llama(), char_codec()
    task = Task("t", "Say", [], [])
    batch = [
        encode_example(codec, task, Example("ab", "xy"), 64),
        encode_example(codec, task, Example("abcd", "z"), 64),
    ]
    loss = answer_loss(model, batch, codec.pad_id)
    # reference: unpadded forward of each sequence, CE over answer + eos positions
    total, n = 0.0, 0
    for p, a in batch:
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum").item()
        n += len(a)
    assert loss.item() == pytest.approx(total / n, rel=1e-4)


def test_greedy_decode_matches_uncached_argmax():
    model, codec = tiny_llama(1), char_codec()
    prompts = [codec.encode("hello"), codec.encode("hi")]
    outs = greedy_decode(model, prompts, max_new_tokens=4, eos_id=-1, pad_id=codec.pad_id)
    for p, o in zip(prompts, outs):
        ids = list(p)
        for _ in range(4):
            ids.append(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
        assert o == ids[len(p) :]


def test_training_learns_a_task():
    model, codec = tiny_llama(), char_codec()
    tasks = small_suite(1, n_train=32, n_test=8)
    mbf.inject(
        model,
        mbf.LoRAConfig(
            r=4,
            alpha=8,
        ),
    )
    cl = mbf.ContinualLoRA(model)
    cl.begin_task()
    stats = train_steps(
        model,
        cl.trainable_parameters(),
        codec,
        [(tasks[0], e) for e in tasks[0].train],
        TrainOptions(lr=1e-2, epochs=10, max_steps=25, batch_size=8),
        seed=0,
    )
    # a random tiny model first learns the answer space (12 color words), then the eos
    assert stats["steps"] == 25 and stats["final_loss"] < 0.6 * stats["first_loss"]


def test_method_options():
    assert method_options("slao") == {"init": "orthogonal", "schedule": "sqrt", "constant": 0.5}
    assert method_options("seq-lora")["init"] == "none" and method_options("seq-lora")["schedule"] == "none"
    assert method_options("ftba-mb") == {"init": "none", "schedule": "sqrt", "constant": 0.5}
    assert method_options("slao", schedule="inverse")["schedule"] == "inverse"
    assert method_options("multi-task") is None
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        method_options("lora")
    with pytest.raises(ValueError, match="multi-task"):
        method_options("multi-task", init="random")
    assert set(METHODS) >= {"slao", "seq-lora", "ftba-mb", "slao-inverse", "slao-random", "multi-task"}


def _run(out, method="slao", resume=False, tasks=None, **kw):
    model, codec = tiny_llama(), char_codec()
    return run_continual(
        model,
        codec,
        tasks or small_suite(),
        out,
        method=method,
        lora=LORA,
        opts=TrainOptions(lr=5e-3, max_steps=4, batch_size=4, eval_batch_size=4, seed=1),
        resume=resume,
        meta={"suite": "builtin", "model": "tiny"},
        log=lambda s: None,
        **kw,
    )


def test_continual_run_writes_a_complete_report(tmp_path):
    res = _run(tmp_path / "run")
    saved = read_results(tmp_path / "run")
    assert saved == json.loads(json.dumps(res))
    assert saved["complete"] and saved["stages"] == ["color", "first", "animal"]
    assert [len(r) for r in saved["accuracy"]] == [1, 2, 3]
    assert all(0 <= a <= 1 for r in saved["accuracy"] for a in r)
    assert saved["metrics"]["AA"] == pytest.approx(sum(saved["accuracy"][-1]) / 3, abs=1e-4)
    # SLAO state is two adapters per layer, the same after every task
    assert len({p["adapter_bytes"] for p in saved["per_task"]}) == 1
    assert all(p["train_s"] > 0 and p["peak_rss_mb"] > 0 for p in saved["per_task"])
    assert (tmp_path / "run" / "results.md").read_text().startswith("# slao")
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 1000
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["task-03"]
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path / "run")


@pytest.mark.parametrize("method", ["slao", "slao-random"])  # slao-random draws its init from the RNG
def test_resume_equals_uninterrupted_run(tmp_path, method):
    full = _run(tmp_path / "full", method=method)
    # interrupt after task 2: run the first two tasks of the same suite, then resume with all three
    tasks = small_suite()
    model, codec = tiny_llama(), char_codec()
    opts = TrainOptions(lr=5e-3, max_steps=4, batch_size=4, eval_batch_size=4, seed=1)
    with pytest.raises(KeyboardInterrupt):
        run_continual(
            model,
            codec,
            tasks,
            tmp_path / "cut",
            method=method,
            lora=LORA,
            opts=opts,
            meta={"suite": "builtin", "model": "tiny"},
            log=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if "task 2/3" in s else None,
        )
    partial = read_results(tmp_path / "cut")
    assert len(partial["per_task"]) == 2 and not partial["complete"] and partial["metrics"]["AA"] is None
    resumed = _run(tmp_path / "cut", method=method, resume=True)
    assert resumed["complete"]
    assert resumed["accuracy"] == full["accuracy"]
    assert [p["final_loss"] for p in resumed["per_task"]] == pytest.approx(
        [p["final_loss"] for p in full["per_task"]]
    )


def test_resume_rejects_a_different_method(tmp_path):
    _run(tmp_path / "r", tasks=small_suite(1))
    with pytest.raises(ValueError, match="method='slao'"):
        _run(tmp_path / "r", method="seq-lora", resume=True, tasks=small_suite(1))


def test_seq_lora_merged_equals_finetuned_and_multitask(tmp_path):
    seq = _run(tmp_path / "seq", method="seq-lora")
    assert seq["options"]["init"] == "none" and seq["complete"]
    mt = _run(tmp_path / "mt", method="multi-task")
    assert mt["stages"] == ["all"] and len(mt["accuracy"][0]) == 3 and mt["metrics"]["BWT"] is None
    assert mt["per_task"][0]["steps"] == 12  # same total steps as the sequence: 4 per task
    md, png = compare_runs([tmp_path / "seq", tmp_path / "mt"], tmp_path / "cmp")
    text = md.read_text()
    assert "| seq-lora |" in text and "| multi-task |" in text and png.stat().st_size > 1000


def test_compare_averages_seeds_and_rejects_mixed_suites(tmp_path):
    a = _run(tmp_path / "a")
    model, codec = tiny_llama(), char_codec()
    run_continual(
        model,
        codec,
        small_suite(),
        tmp_path / "b",
        method="slao",
        lora=LORA,
        opts=TrainOptions(lr=5e-3, max_steps=4, batch_size=4, eval_batch_size=4, seed=2),
        meta={"suite": "builtin", "model": "tiny"},
        log=lambda s: None,
    )
    md, _ = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert "| slao | 1, 2 |" in md.read_text() and "±" in md.read_text()
    # a run with other settings is labelled apart, never averaged in as another seed
    model, codec = tiny_llama(), char_codec()
    run_continual(
        model,
        codec,
        small_suite(),
        tmp_path / "lr",
        method="slao",
        lora=LORA,
        opts=TrainOptions(lr=1e-3, max_steps=4, batch_size=4, eval_batch_size=4, seed=1),
        meta={"suite": "builtin", "model": "tiny"},
        log=lambda s: None,
    )
    md, _ = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "lr"], tmp_path / "cmp3")
    assert "| slao [lr=0.005] | 1, 2 |" in md.read_text() and "| slao [lr=0.001] | 1 |" in md.read_text()
    _run(tmp_path / "c", tasks=small_suite(2))
    with pytest.raises(ValueError, match="different task sequences"):
        compare_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "cmp2")
    assert a["complete"]


def test_evaluate_counts_exact_matches():
    model, codec = tiny_llama(), char_codec()
    task = small_suite(1, n_test=5)[0]
    acc = evaluate(model, codec, task, TrainOptions(eval_batch_size=2))
    assert acc == 0.0  # a random tiny model does not answer a color word

"""The training loop, evaluation and continual runs, on the tiny Llama with a character tokenizer.

Whole runs are the slow part: one SLAO run is shared by every test that only reads it, and the
comparison tests read synthetic results.json files.
"""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from fixtures.tiny import CHARS, EOS, OFFSET, char_codec, tiny_llama

import mbf
from mbf.experiment import predictions
from mbf.experiment import results as results_file
from mbf.experiment.batches import encode_example
from mbf.experiment.evaluate import evaluate, greedy_decode
from mbf.experiment.methods import METHODS, PAPER_ABLATIONS, method_config, method_label
from mbf.experiment.report import compare_runs
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite as builtin_suite
from mbf.experiment.tasks import Example, Task
from mbf.experiment.train import TrainOptions, answer_loss, train_steps

LORA = mbf.LoRAConfig(r=4, alpha=8)
OPTS = TrainOptions(lr=5e-3, max_steps=4, batch_size=4, eval_batch_size=4, seed=1)
META = {"suite": "builtin", "model": "tiny"}


def small_suite(n_tasks=3, n_train=16, n_test=6):
    return builtin_suite(0, n_train=n_train, n_test=n_test, n_tasks=n_tasks)


def _run(out, method="slao", resume=False, tasks=None, log=lambda s: None, overrides=None, **kw):
    kw = {"lora": LORA, "opts": OPTS, "meta": META, **kw}
    if overrides:  # the method's configuration with these changes, built once, as the CLI does
        kw["config"] = method_config(method, **overrides)
    return run_continual(
        tiny_llama(),
        char_codec(),
        tasks or small_suite(),
        out,
        method=method,
        resume=resume,
        log=log,
        **kw,
    )


@pytest.fixture(scope="module")
def slao_run(tmp_path_factory):
    """One complete SLAO run (3 tasks): ``(run dir, returned results)``. Tests copy it to change it."""
    out = tmp_path_factory.mktemp("slao") / "run"
    return out, _run(out)


# -- the loop's parts ------------------------------------------------------------------------------


def test_loss_covers_answer_tokens_only():
    """The loss equals a hand-computed CE on the answer tokens of each unpadded sequence."""
    model, codec = tiny_llama(), char_codec()
    task = Task("t", "Say", [], [])
    batch = [
        encode_example(codec, task, Example("ab", "xy"), 64),
        encode_example(codec, task, Example("abcd", "z"), 64),
    ]
    loss = answer_loss(model, batch, codec.pad_id)
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
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
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


def test_a_non_finite_loss_says_what_to_change():
    """Before the first update the learning rate is not the cause; after it, lr and alpha are."""
    tasks = small_suite(1, n_train=8, n_test=2)
    examples = [(tasks[0], e) for e in tasks[0].train]

    def train(model, lr):
        mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
        params = [p for p in model.parameters() if p.requires_grad]
        opts = TrainOptions(lr=lr, epochs=3, batch_size=4)  # 6 steps
        return train_steps(model, params, char_codec(), examples, opts, seed=0)

    broken = tiny_llama()
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0; before the first update, so not --lr"):
        train(broken, lr=1e-3)
    with pytest.raises(FloatingPointError, match=r"at step [1-5]; lower --lr or --alpha"):
        train(tiny_llama(), lr=1e38)  # B = 1e38 after one step: B @ A overflows


class ScriptedCache(dict):
    """What ScriptedDecoder hands back as its KV cache: the shared head, then the replies and the step."""

    def batch_repeat_interleave(self, n: int) -> None:  # the head is shared by every row already
        pass


class ScriptedDecoder(torch.nn.Module):
    """Replies to each prompt with a scripted token sequence, then eos, through the evaluator's calls:
    its last hidden state is the one-hot of the next token (the LM head is the identity).

    The first call sees the task's head (the prompt's part every example shares), the second the
    left-padded rest of each prompt after it; each later call one token per row and the cache it
    returned, which here carries the replies and the step.
    """

    def __init__(self, replies: dict[tuple[int, ...], list[int]], vocab: int) -> None:
        super().__init__()
        self.replies, self.vocab = replies, vocab

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None
    ):
        if attention_mask is None:  # the shared head
            return SimpleNamespace(
                last_hidden_state=None, past_key_values=ScriptedCache(head=input_ids[0].tolist())
            )
        if "replies" not in past_key_values:
            head = past_key_values["head"]
            rests = [ids[m[len(head) :].bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
            state = ScriptedCache(replies=[self.replies[tuple(head + r)] for r in rests], step=0)
        else:
            state = ScriptedCache(past_key_values, step=past_key_values["step"] + 1)
        nxt = [r[state["step"]] if state["step"] < len(r) else EOS for r in state["replies"]]
        hidden = torch.nn.functional.one_hot(torch.tensor(nxt), self.vocab).float()[:, None]  # (B, 1, V)
        return SimpleNamespace(last_hidden_state=hidden, past_key_values=state)


class ScriptedLM(torch.nn.Module):
    """A causal LM as greedy_decode reads one: ``model`` the decoder, ``lm_head`` the head."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], vocab: int) -> None:
        super().__init__()
        self.model, self.lm_head = ScriptedDecoder(replies, vocab), torch.nn.Identity()


def test_evaluate_scores_exactly_the_right_answers():
    """3 of 5 answers right → 0.6, across uneven batches; a wrong word or a longer answer is wrong."""
    codec, opts = char_codec(), TrainOptions(eval_batch_size=2, max_length=256)
    task = small_suite(1, n_test=5)[0]
    right = {0, 2, 3}
    replies = {}
    for i, ex in enumerate(task.test):
        other = next(w for w in ex.input.split() if w != ex.output)
        text = f" {ex.output}\nmore" if i == 3 else f" {ex.output}" if i in right else f" {other}"
        if i == 4:
            text = f" {ex.output}s"  # one letter too many
        prompt = encode_example(codec, task, ex, opts.max_length)[0]
        replies[tuple(prompt)] = codec.encode(text)
    model = ScriptedLM(replies, vocab=len(CHARS) + OFFSET)
    assert evaluate(model, codec, task, opts) == pytest.approx(3 / 5, abs=0)


# -- methods ---------------------------------------------------------------------------------------


def test_method_config():
    slao = method_config("slao")
    assert (slao.init, slao.schedule, slao.constant, slao.orthogonal_updates) == (
        "orthogonal",
        "sqrt",
        0.5,
        False,
    )
    assert method_config("seq-lora") == mbf.ContinualConfig(init="none", schedule="none")
    assert method_config("ftba-mb") == mbf.ContinualConfig(init="none", schedule="sqrt")
    assert method_config("slao", schedule="inverse").schedule == "inverse"
    assert method_config("slao", init="random").init == "random"
    assert method_config("slao-constant", constant=0.25).constant == 0.25
    assert method_config("multi-task") is None
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        method_config("lora")
    with pytest.raises(ValueError, match="multi-task"):
        method_config("multi-task", init="random")
    with pytest.raises(ValueError, match=r"constant λ=1.5 must be in \(0, 1\]"):
        method_config("slao-constant", constant=1.5)
    assert set(METHODS) >= {"slao", "seq-lora", "ftba-mb", "slao-inverse", "slao-random", "multi-task"}


def test_method_label_names_what_differs_from_the_preset():
    assert method_label("slao", method_config("slao").to_dict()) == "slao"
    assert (
        method_label("slao", {"init": "orthogonal", "schedule": "sqrt", "constant": 0.5}) == "slao"
    )  # older file
    assert (
        method_label("slao", method_config("slao", schedule="inverse").to_dict())
        == "slao (orthogonal, inverse)"
    )
    assert method_label("slao-constant", method_config("slao-constant", constant=0.3).to_dict()) == (
        "slao-constant (λ=0.3)"
    )
    strict = {**method_config("slao").to_dict(), "orthogonal_updates": True}
    assert method_label("slao", strict) == "slao (orthogonal updates)"
    assert method_label("multi-task", None) == "multi-task"


# -- whole runs ------------------------------------------------------------------------------------


def test_continual_run_writes_a_complete_report(slao_run):
    run, returned = slao_run
    saved = results_file.read(run)
    assert saved == json.loads(json.dumps(returned))
    assert saved["complete"] and saved["stages"] == ["color", "first", "animal"]
    assert saved["options"] == method_config("slao").to_dict() and saved["lora"] == LORA.to_dict()
    assert [len(r) for r in saved["accuracy"]] == [2, 3, 3]  # the seen tasks and the next one (FWT)
    assert all(0 <= a <= 1 for r in saved["accuracy"] for a in r)
    assert saved["metrics"]["AA"] == pytest.approx(sum(saved["accuracy"][-1]) / 3, abs=1e-4)
    z, acc = saved["zero_shot"], saved["accuracy"]
    assert len(z) == 3 and all(0 <= x <= 1 for x in z)
    fwt = ((acc[0][1] - z[1]) + (acc[1][2] - z[2])) / 2
    assert saved["metrics"]["FWT"] == pytest.approx(fwt, abs=1e-4)
    # SLAO state is two adapters per layer, the same after every task: by hand, r (in + out) fp32 per adapter
    # on q_proj (64 -> 64) and v_proj (64 -> 32) of 2 layers, and AdamW's two fp32 moments of one adapter
    adapter = sum(LORA.r * (i + o) * 4 for i, o in [(64, 64), (64, 32)] * 2)
    assert [p["adapter_bytes"] for p in saved["per_task"]] == [2 * adapter] * 3
    assert [p["optimizer_bytes"] for p in saved["per_task"]] == [2 * adapter] * 3
    assert "buffer_bytes" not in saved["per_task"][0]  # data-free
    assert all(p["train_s"] > 0 and p["peak_rss_mb"] > 0 for p in saved["per_task"])
    assert (run / "results.md").read_text().startswith("# slao")
    assert (run / "accuracy.png").stat().st_size > 1000
    # no temporary file left behind (the lock file stays: the lock is its flock); only the last checkpoint
    assert sorted(p.name for p in run.iterdir()) == [
        ".mbf-lock",
        "accuracy.png",
        "checkpoints",
        "predictions",
        "results.json",
        "results.md",
    ]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["task-03"]


def test_every_evaluation_keeps_its_predictions(slao_run):
    """Per-example records of the zero-shot pass and of every stage agree with results.json's matrix; the
    fine-tuned adapter's diagonal is recorded beside the merged one's, and LA of both."""
    run, saved = slao_run
    names = sorted(p.name for p in (run / "predictions").iterdir())
    assert names == ["stage-01.json", "stage-02.json", "stage-03.json", "zero-shot.json"]
    zero = predictions.read(run, 0)
    assert [e["score"] for e in zero["evals"]] == pytest.approx(saved["zero_shot"], abs=1e-4)
    tasks = small_suite()
    for i, row in enumerate(saved["accuracy"]):
        stage = predictions.read(run, i + 1)
        assert stage["after"] == saved["stages"][i]
        merged = [e for e in stage["evals"] if e["adapter"] == "merged"]
        assert [e["task"] for e in merged] == saved["tasks"][: len(row)]
        for e, a, t in zip(merged, row, tasks):
            assert e["gold"] == [ex.output for ex in t.test] and e["ids"] == list(range(len(t.test)))
            assert sum(e["correct"]) / len(e["correct"]) == pytest.approx(a, abs=1e-4)
            assert e["correct"] == [float(p.strip() == g) for p, g in zip(e["pred"], e["gold"])]
        (own,) = [e for e in stage["evals"] if e["adapter"] == "finetuned"]
        assert own["task"] == saved["stages"][i] and own["score"] == pytest.approx(
            saved["finetuned_diagonal"][i], abs=1e-4
        )
    m = saved["metrics"]
    assert m["LA"] == pytest.approx(sum(saved["accuracy"][j][j] for j in range(3)) / 3, abs=1e-4)
    assert m["LA_finetuned"] == pytest.approx(sum(saved["finetuned_diagonal"]) / 3, abs=1e-4)
    assert m["by_scorer"]["generate"]["AA"] == m["AA"]
    with pytest.raises(FileExistsError, match="--resume"):
        _run(run)


@pytest.mark.parametrize("method", ["slao", "slao-random"])  # slao-random draws its init from the RNG
def test_resume_equals_uninterrupted_run(tmp_path, method, slao_run):
    full = slao_run[1] if method == "slao" else _run(tmp_path / "full", method=method)

    def interrupt_after_task_2(line: str) -> None:
        if "task 2/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", method=method, log=interrupt_after_task_2)
    partial = results_file.read(tmp_path / "cut")
    assert len(partial["per_task"]) == 2 and not partial["complete"] and partial["metrics"]["AA"] is None
    mine = tmp_path / "cut" / "checkpoints" / "task-final"  # a user's folder beside the run's own
    mine.mkdir()
    resumed = _run(tmp_path / "cut", method=method, resume=True)
    assert resumed["complete"]
    assert sorted(p.name for p in mine.parent.iterdir()) == ["task-03", "task-final"]  # only task-02 pruned
    assert resumed["accuracy"] == full["accuracy"]
    assert [p["final_loss"] for p in resumed["per_task"]] == pytest.approx(
        [p["final_loss"] for p in full["per_task"]]
    )


def test_resume_checks_the_saved_settings(tmp_path, slao_run):
    """Every setting that decides what the remaining tasks train and test on must match; the error lists
    each difference as ``name: saved -> given``. The run is complete, so an accepted resume trains nothing."""
    run = tmp_path / "r"
    shutil.copytree(slao_run[0], run)
    with pytest.raises(ValueError, match="method: 'slao' -> 'seq-lora'; options.init: 'orthogonal' -> "):
        _run(run, method="seq-lora", resume=True)
    with pytest.raises(ValueError, match="options.schedule: 'sqrt' -> 'inverse'"):
        _run(run, overrides={"schedule": "inverse"}, resume=True)
    other = TrainOptions(**{**OPTS.__dict__, "lr": 1e-3, "max_steps": 2, "batch_size": 2, "grad_accum": 2})
    with pytest.raises(ValueError, match=r"train.batch_size: 4 -> 2; train.grad_accum: 1 -> 2; "
                                         r"train.lr: 0.005 -> 0.001; train.max_steps: 4 -> 2\)"):  # fmt: skip
        _run(run, resume=True, opts=other)
    with pytest.raises(ValueError, match=r"lora.dropout: 0.0 -> 0.1"):
        _run(run, resume=True, lora=mbf.LoRAConfig(r=4, alpha=8, dropout=0.1))
    with pytest.raises(ValueError, match=r"data_fingerprint: \w{12} -> \w{12}"):
        _run(run, resume=True, tasks=small_suite(n_train=8), meta={**META, "n_train": 8})
    with pytest.raises(ValueError, match=r"model_fingerprint: \w{12} -> \w{12}"):  # same shape, other weights
        run_continual(tiny_llama(seed=1), char_codec(), small_suite(), run, lora=LORA, opts=OPTS, meta=META,
                      resume=True)  # fmt: skip
    # the same weights from another path resume (a moved checkpoint); so does another eval batch size
    eval_only = TrainOptions(**{**OPTS.__dict__, "eval_batch_size": 2})
    assert _run(run, resume=True, meta={**META, "model": "/moved/tiny"}, opts=eval_only)["complete"]
    # options written before a field existed resume as that field's default; fingerprints absent from
    # an older file are not compared
    saved = json.loads((run / "results.json").read_text())
    del saved["options"]["orthogonal_updates"], saved["data_fingerprint"], saved["model_fingerprint"]
    del saved["run_id"]  # an older file (schema /1): no run_id either, and a checksum of what it holds
    saved["schema"] = results_file.LEGACY_SCHEMA  # (one without a checksum is not resumed: test_read_back.py)
    (run / "results.json").write_text(json.dumps({**saved, "sha256": results_file.checksum(saved)}))
    assert _run(run, resume=True)["accuracy"] == slao_run[1]["accuracy"]


def test_an_accepted_change_on_resume_is_recorded(tmp_path):
    """``accept_changes``: the remaining tasks run with the new settings, and results.json / results.md
    say after which task and what changed."""

    def interrupt_after_task_1(line: str) -> None:
        if "task 1/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", log=interrupt_after_task_1)
    lower = TrainOptions(**{**OPTS.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match="--accept-changes"):
        _run(tmp_path / "cut", resume=True, opts=lower)
    resumed = _run(tmp_path / "cut", resume=True, opts=lower, accept_changes=True)
    assert resumed["complete"]
    assert resumed["resumed_with_changes"] == [{"after_task": 1, "changes": ["train.lr: 0.005 -> 0.001"]}]
    assert resumed["train"]["lr"] == 5e-3  # the recorded settings stay those the run started with
    md = (tmp_path / "cut" / "results.md").read_text()
    assert "Resumed after task 1 with changed settings (--accept-changes): train.lr: 0.005 -> 0.001" in md


def _labelled(tasks):
    """The tasks with their answer vocabulary as options (what --scoring rank needs)."""
    return [dataclasses.replace(t, labels=sorted({e.output for e in t.train + t.test})) for t in tasks]


def test_seq_lora_and_multitask_runs(tmp_path):
    both = dataclasses.replace(OPTS, scoring="both")
    seq = _run(tmp_path / "seq", method="seq-lora", tasks=_labelled(small_suite()), opts=both)
    assert seq["options"]["init"] == "none" and seq["complete"]
    assert (
        seq["accuracy_by_scorer"]["generate"] == seq["accuracy"]
        and len(seq["accuracy_by_scorer"]["rank"]) == 3
    )
    assert seq["zero_shot_by_scorer"]["generate"] == seq["zero_shot"]
    assert set(seq["metrics"]["by_scorer"]) == {"generate", "rank"}
    # λ ≡ 1: the fine-tuned adapter is the merged one, its diagonal taken as it is
    assert seq["finetuned_diagonal"] == [seq["accuracy"][j][j] for j in range(3)]
    ranked = predictions.read(tmp_path / "seq", 3)["evals"]
    assert {(e["scorer"], "option_scores" in e) for e in ranked} == {("generate", False), ("rank", True)}
    mt = _run(tmp_path / "mt", method="multi-task", tasks=_labelled(small_suite()), opts=both)
    assert mt["stages"] == ["all"] and len(mt["accuracy"][0]) == 3 and mt["metrics"]["BWT"] is None
    assert mt["options"] is None and mt["checkpoint"] is None
    assert mt["per_task"][0]["steps"] == 12  # same total steps as the sequence: 4 per task
    assert mt["metrics"]["AA"] == pytest.approx(sum(mt["accuracy"][0]) / 3, abs=1e-4)
    resumed = _run(
        tmp_path / "mt", method="multi-task", resume=True, tasks=_labelled(small_suite()), opts=both
    )
    assert resumed == results_file.read(tmp_path / "mt")
    md, png = compare_runs([tmp_path / "seq", tmp_path / "mt"], tmp_path / "cmp")
    text = md.read_text()
    assert "| seq-lora |" in text and "| multi-task |" in text and png.stat().st_size > 1000


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 accumulated = one batch of 4 (answers of one length: same token mean)."""
    task = Task("t", "Say", [Example(w, w[:2]) for w in ("abc", "abd", "acd", "bcd")], [])
    examples = [(task, ex) for ex in task.train]
    weights = []
    for batch, accum in ((4, 1), (2, 2)):
        model = tiny_llama()
        mbf.inject(model, LORA)
        cl = mbf.ContinualLoRA(model)
        cl.begin_task()
        torch.nn.init.normal_(next(iter(cl.layers.values())).lora_B)  # a non-zero B: A gets a gradient
        opts = TrainOptions(lr=1e-2, max_steps=1, batch_size=batch, grad_accum=accum, warmup_steps=1)
        stats = train_steps(model, cl.trainable_parameters(), char_codec(), examples, opts, seed=0)
        assert stats["steps"] == 1
        weights.append([p.detach().clone() for p in cl.trainable_parameters()])
    for big, accumulated in zip(*weights):
        torch.testing.assert_close(accumulated, big, rtol=1e-4, atol=1e-6)
    assert TrainOptions(batch_size=1, grad_accum=8).steps_for(20) == 3
    with pytest.raises(ValueError, match="grad_accum=0"):
        TrainOptions(grad_accum=0)


@pytest.mark.parametrize("method", PAPER_ABLATIONS)
def test_the_papers_ablations_run_and_merge_what_they_say(tmp_path, method):
    res = _run(tmp_path / method, method=method, tasks=small_suite(2, n_train=8, n_test=4))
    config = method_config(method)
    assert (
        res["complete"]
        and res["options"]["train"] == config.train
        and res["options"]["merged_factors"] == config.merged_factors
    )
    assert config.init == "none" and config.schedule == "sqrt"  # the plain carried-over init, SLAO's λ


def test_orthogonal_updates_run_projects_every_step(tmp_path):
    """Strict mode through the run: task 2's A moved only orthogonally to task 1's row space."""
    from mbf.continual import ContinualLoRA

    tasks = small_suite(2, n_train=8, n_test=4)
    _run(tmp_path / "o", tasks=tasks[:1], overrides={"orthogonal_updates": True})
    one = ContinualLoRA.load(tiny_llama(), tmp_path / "o" / "checkpoints" / "task-01")
    res = _run(tmp_path / "o2", tasks=tasks, overrides={"orthogonal_updates": True})
    assert res["options"]["orthogonal_updates"] is True
    two = ContinualLoRA.load(tiny_llama(), tmp_path / "o2" / "checkpoints" / "task-02")
    for (name, l1), l2 in zip(one.layers.items(), two.layers.values()):
        q = torch.linalg.qr(l1.lora_A.detach().T).Q.T  # (r, in): task 1's row space
        # task 2 began at A0 = D q (D: signs) and moved by ΔA with ΔA qᵀ = 0, so A qᵀ = D
        torch.testing.assert_close((l2.lora_A.detach() @ q.T).abs(), torch.eye(q.shape[0]), atol=1e-5, rtol=0)
        assert not torch.allclose(l2.lora_A.detach(), l1.lora_A.detach()), name  # it did train


def test_offdiag_cells_can_use_fewer_test_examples(tmp_path):
    """``offdiag_test``: the cells no metric reads (j < i < T-1) on the first N examples; the diagonal,
    the next task and the final row keep every example."""
    res = _run(tmp_path / "o", opts=dataclasses.replace(OPTS, offdiag_test=2))
    sizes = [{(e["task"], e["adapter"]): len(e["ids"]) for e in predictions.read(tmp_path / "o", s)["evals"]}
             for s in (1, 2, 3)]  # fmt: skip
    assert sizes[1][("color", "merged")] == 2 and sizes[1][("first", "merged")] == 6
    assert all(n == 6 for s in (sizes[0], sizes[2]) for n in s.values())
    assert res["complete"] and res["train"]["offdiag_test"] == 2

"""Every method under the transformers Trainer through ``ContinualCallback``: two tasks on a tiny Llama,
eval() computing with the strategy's merged adapter, the protocol's hooks (O-LoRA's loss term once per
optimizer step, strict mode's per-step projection, InfLoRA's inputs from the Trainer's data, replay's
dataset), and kill-and-resume through the Trainer's checkpoints equal to an uninterrupted run."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama, token_examples
from conftest import trainer_args as _args

import mbf
from mbf.checkpoint import read_checkpoint
from mbf.closed_form import free_projector
from mbf.strategies.inflora import InfLoRA
from mbf.strategies.olora import OLoRA
from mbf.strategies.replay import ExperienceReplay, Replay, ReplayConfig, ReplayDataset, draw_buffer
from mbf.strategies.sketch import SketchMerge
from mbf.strategies.task_merge import TaskMergeLoRA

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install mbf-lora[app])")
from mbf.integrations import ContinualCallback, SLAOCallback  # noqa: E402

R = 4
REPLAY = ReplayConfig(fraction=0.25, seed=5)  # 2 of a task's 8 examples kept


def _strategy(method: str, model):
    """The method's strategy on ``model`` (injected here: the same LoRA init for every run of a test)."""
    mbf.inject(model, mbf.LoRAConfig(r=R, alpha=8, target_modules=["q_proj", "v_proj"]))
    make = {
        "slao": lambda: mbf.ContinualLoRA(model, backend="torch"),
        "seq-lora": lambda: mbf.ContinualLoRA(model, init="none", schedule="none", backend="torch"),
        "o-lora": lambda: OLoRA(model, lambda_orth=5.0, lambda_l2=0.01),
        "inflora": lambda: InfLoRA(model),
        "sketch-merge": lambda: SketchMerge(model, rank=6, sketch=8),
        "task-arithmetic": lambda: TaskMergeLoRA(model, merge="task_arithmetic"),
        "ties": lambda: TaskMergeLoRA(model, merge="ties"),
        "replay": lambda: ExperienceReplay(model, REPLAY),
        "slao+replay": lambda: Replay(mbf.ContinualLoRA(model, backend="torch"), REPLAY),
    }
    return make[method]()


METHODS = ["slao", "seq-lora", "o-lora", "inflora", "task-arithmetic", "ties", "replay", "slao+replay",
           "sketch-merge"]  # fmt: skip


class _Stop(Exception):
    pass


TASKS = [token_examples(0, n=8, T=8), token_examples(1, n=8, T=8)]
IDS = torch.randint(2, 97, (2, 7), generator=torch.Generator().manual_seed(9))




def _train_dataset(cl, task: int):
    return cl.dataset(TASKS[: task + 1]) if isinstance(cl, Replay) else TASKS[task]


def _train(model, cl, task: int, out, callbacks=(), resume=None, **args):
    trainer = transformers.Trainer(
        model=model, args=_args(out, **args), train_dataset=_train_dataset(cl, task),
        callbacks=[ContinualCallback(cl), *callbacks],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _state(cl, folder) -> dict[str, torch.Tensor]:
    """Every tensor of the strategy's checkpoint (its adapters and its own state), by name."""
    cl.save(folder)
    return read_checkpoint(folder, strategy=None).tensors


@pytest.mark.parametrize("method", METHODS)
def test_two_tasks_under_the_trainer_end_with_eval_on_the_merged_adapter(tmp_path, method):
    model = make_tiny_llama()
    bare = _logits(model)
    cl = _strategy(method, model)
    after_task_1 = {}
    for task in range(2):
        trainer = _train(model, cl, task, tmp_path / f"t{task}")
        assert cl.task_index == task + 1 and not cl.in_task, "end_task() ran on train end"
        if task == 0 and method == "inflora":
            after_task_1 = {n: free_projector(m, cl.kind[n]) for n, m in cl.memory.items()}
    model.eval()
    got = _logits(model)
    with cl.merged():
        want = _logits(model)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # eval() = what inference uses
    assert not torch.allclose(got, bare, atol=1e-4), "the adapters trained and compute"
    if cl.finetuned_differs:  # eval() is not the task's own adapter
        with cl.adapter_mode("finetuned"):
            assert not torch.allclose(_logits(model), want, atol=1e-5)
    metrics = trainer.evaluate(eval_dataset=TASKS[1])  # the Trainer's evaluation: the merged adapter
    batch = transformers.default_data_collator(TASKS[1])
    with torch.no_grad(), cl.merged():
        assert metrics["eval_loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    # the state saved after the last task reloads as the same model
    folder = tmp_path / "t1" / cl.strategy_name
    fresh = make_tiny_llama()
    if isinstance(cl, Replay) and type(cl) is Replay:
        loaded = Replay.load(fresh, folder)
        assert loaded.kept == cl.kept
    else:
        loaded = mbf.strategies.load_strategy(fresh, folder)
    fresh.eval()
    torch.testing.assert_close(_logits(fresh), got, atol=1e-6, rtol=1e-6)

    layers = list(cl.layers)
    if method in ("o-lora", "inflora"):  # two frozen branches per layer
        assert all(cl.branches.A[n].shape[0] == 2 * R for n in layers)
    if (
        method == "inflora"
    ):  # task 2's A was designed off task 1's input subspace (seen from the Trainer's data)
        for n in layers:
            free = after_task_1[n]  # projector onto what task 1's inputs left unprotected
            assert free.trace() < free.shape[0] - 0.5  # task 1 protected some directions
            A2 = cl.branches.A[n][R:]
            assert (A2 - A2 @ free).abs().max() < 1e-4 * A2.abs().max()
    if method in ("task-arithmetic", "ties"):
        assert len(cl.kept) == 2 and cl.deltas is not None
    if method in ("replay", "slao+replay"):
        assert cl.kept == [draw_buffer(8, t, REPLAY) for t in range(2)]
        assert len(cl.buffered()) == 4


@pytest.mark.parametrize("method", METHODS)
def test_a_task_killed_mid_way_resumes_from_the_trainers_checkpoint_as_if_uninterrupted(tmp_path, method):
    save = dict(save_strategy="steps", save_steps=2)
    model = make_tiny_llama()
    cl = _strategy(method, model)
    _train(model, cl, 0, tmp_path / "ref0", **save)
    _train(model, cl, 1, tmp_path / "ref1", **save)
    want_state, want_logits = _state(cl, tmp_path / "want"), _logits(model.eval())

    class Kill(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Stop  # the process dies during step 3 of task 2, after checkpoint-2

    model2 = make_tiny_llama()  # resumes between the tasks from the state saved after task 1, in place
    cl2 = _strategy(method, model2)
    cl2.restore(tmp_path / "ref0" / cl.strategy_name)
    with pytest.raises(_Stop):
        _train(model2, cl2, 1, tmp_path / "run1", callbacks=[Kill()], **save)
    ckpt = tmp_path / "run1" / "checkpoint-2"
    assert (ckpt / cl2.strategy_name / "continual.json").is_file()

    model3 = make_tiny_llama()  # a new process: fresh model, fresh strategy; everything from checkpoint-2
    cl3 = _strategy(method, model3)
    _train(model3, cl3, 1, tmp_path / "run1", resume=True, **save)
    assert cl3.task_index == 2 and not cl3.in_task
    got_state = _state(cl3, tmp_path / "got")
    assert set(got_state) == set(want_state)
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(_logits(model3.eval()), want_logits, atol=1e-5, rtol=1e-5)
    if isinstance(cl, Replay):
        assert cl3.kept == cl.kept


def _grads_at_first_step(model, cl, out, **args):
    """The adapters' gradients as the Trainer's first optimizer step of the next task takes them."""
    seen = {}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 0:
                seen.update({id(p): p.grad.clone() for p in cl.trainable_parameters() if p.grad is not None})
                seen["start"] = [(m.lora_A.detach().clone(), m.lora_B.detach().clone())
                                 for m in cl.layers.values()]  # fmt: skip

    _train(model, cl, 1, out, callbacks=[Grab()], max_steps=1, max_grad_norm=0.0, **args)
    return seen


def test_o_loras_loss_term_joins_the_gradient_once_per_optimizer_step(tmp_path):
    """Task 2 in one step of two accumulated micro-batches: the gradient is that of the mean token loss over
    the task's 8 examples plus O-LoRA's term, counted once (not once per micro-batch)."""
    model = make_tiny_llama()
    cl = _strategy("o-lora", model)
    _train(model, cl, 0, tmp_path / "t0")
    grads = _grads_at_first_step(model, cl, tmp_path / "t1", gradient_accumulation_steps=2)
    assert cl.task_index == 2
    # the same gradient by hand, at the adapters the step began from (task 2's LoRA, task 1's branch)
    model2 = make_tiny_llama()
    cl2 = _strategy("o-lora", model2)
    _train(model2, cl2, 0, tmp_path / "u0")
    cl2.begin_task()
    with torch.no_grad():
        for layer, (A, B) in zip(cl2.layers.values(), grads["start"]):
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    model2.train()
    params = cl2.trainable_parameters()
    term = cl2.loss_term()
    task_loss = model2(**transformers.default_data_collator(TASKS[1])).loss
    want = torch.autograd.grad(task_loss + term, params)
    without = torch.autograd.grad(model2(**transformers.default_data_collator(TASKS[1])).loss, params)
    got = [grads[id(p)] for p in cl.trainable_parameters()]
    for g, w, o in zip(got, want, without):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert max((w - o).abs().max().item() for w, o in zip(want, without)) > 1e-3  # the term matters


def test_strict_mode_projects_every_step_under_the_trainer(tmp_path):
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=R, alpha=8, target_modules=["q_proj", "v_proj"]))
    cl = mbf.ContinualLoRA(model, orthogonal_updates=True, backend="torch")
    _train(model, cl, 0, tmp_path / "t0")
    overlaps = []

    class Check(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after ContinualCallback's begin_task()
            self.start = [m.lora_A.detach().clone() for m in cl.layers.values()]
            self.basis = [Q.clone() for Q in cl._basis]

        def on_step_end(self, args, state, control, **kwargs):  # after ContinualCallback's after_step()
            for layer, A0, Q in zip(cl.layers.values(), self.start, self.basis):
                delta = layer.lora_A.detach() - A0
                overlaps.append(((delta @ Q.T).abs().max() / delta.abs().max()).item())

    _train(model, cl, 1, tmp_path / "t1", callbacks=[Check()])
    assert len(overlaps) == 4 * len(cl.layers)
    assert max(overlaps) < 1e-5, "each step's A update is orthogonal to the previous task's rows"


def test_a_replay_strategy_refuses_a_dataset_that_is_not_its_replay_dataset(tmp_path):
    model = make_tiny_llama()
    cl = _strategy("slao+replay", model)
    args = _args(tmp_path / "x")
    with pytest.raises(ValueError, match="train_dataset must be cl.dataset"):
        transformers.Trainer(model=model, args=args, train_dataset=TASKS[0],
                             callbacks=[ContinualCallback(cl)]).train()  # fmt: skip
    assert cl.task_index == 0 and not cl.in_task  # refused before the task began
    with pytest.raises(ValueError, match="the next task is 0"):
        transformers.Trainer(model=model, args=args, train_dataset=cl.dataset(TASKS),
                             callbacks=[ContinualCallback(cl)]).train()  # fmt: skip
    ds = cl.dataset(TASKS)
    assert isinstance(ds, ReplayDataset) and len(ds) == 8 + 2
    assert [ds[i] for i in range(8, 10)] == [TASKS[0][k] for k in draw_buffer(8, 0, REPLAY)]


def test_combinations_that_cannot_train_are_refused_before_training_with_the_reason():
    model = make_tiny_llama()
    olora = ContinualCallback(_strategy("o-lora", model))
    control = transformers.TrainerControl()
    state = transformers.TrainerState()
    with pytest.raises(ValueError, match="under DeepSpeed the engine owns the gradients"):
        olora.on_init_end(SimpleNamespace(deepspeed="ds.json", fsdp=None), state, control)
    with pytest.raises(ValueError, match="that FSDP would shard"):
        olora.on_init_end(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]), state, control)
    with pytest.raises(TypeError, match="not a continual strategy"):
        ContinualCallback(model)
    assert issubclass(SLAOCallback, ContinualCallback)

"""The strategy framework (mbf.strategies) and O-LoRA on the tiny Llama: the loss against a hand
computation, the frozen branches against folding them into W, memory against a hand count, checkpoints,
resume, the method registry and the command line."""

import json

import pytest
import torch
from conftest import assert_close, fake_tasks, fake_training
from fixtures.tiny import char_codec, save_tiny_checkpoint, tiny_llama

import mbf
from mbf.checkpoint import META
from mbf.cli import main
from mbf.experiment import results as results_file
from mbf.experiment.methods import method_config, method_label
from mbf.experiment.run import run_continual
from mbf.experiment.suites.conflict import conflict_suite
from mbf.experiment.train import TrainOptions, train_steps
from mbf.strategies import ContinualStrategy, load_strategy, make_strategy
from mbf.strategies.olora import OLoRA, OLoRAConfig, orthogonality_loss

LORA = mbf.LoRAConfig(r=4, alpha=8)


def _olora(tasks: int = 0, seed: int = 0, **options) -> OLoRA:
    """O-LoRA on a fresh tiny Llama (r 4 on q, v) after ``tasks`` tasks of ``fake_training``."""
    model = tiny_llama(seed, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    return fake_tasks(OLoRA(model, OLoRAConfig(**options)), tasks, seed)


@pytest.mark.parametrize("norm", ["paper", "code"])
def test_loss_term_value_and_gradient_against_a_hand_computation(norm):
    cl = _olora(tasks=2, lambda_orth=0.5, lambda_l2=0.3, norm=norm)
    cl.begin_task()
    fake_training(cl, torch.Generator().manual_seed(5))
    term = cl.loss_term()
    term.backward()
    expected = 0.0
    for name, layer in cl.layers.items():
        P = cl.branches.A[name].double()  # (2r, in): both past tasks' A
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        assert P.shape == (2 * LORA.r, layer.in_features)
        # ovl = O_{i,t}[j, k] = <row j of A_i, row k of A_t>, element by element (both past i)
        ovl = torch.tensor(
            [[float(P[j] @ A[k]) for k in range(LORA.r)] for j in range(P.shape[0])], dtype=P.dtype
        )
        if norm == "paper":
            orth, d_orth = (ovl**2).sum(), 2 * A @ P.T @ P  # d/dA ‖P Aᵀ‖² = 2 A Pᵀ P
            l2, dA_l2, dB_l2 = (A**2).sum() + (B**2).sum(), 2 * A, 2 * B
        else:
            orth, d_orth = ovl.abs().sum(), torch.sign(ovl).T @ P  # d/dA Σ|P Aᵀ| = sign(P Aᵀ)ᵀ P
            l2, dA_l2, dB_l2 = A.norm() + B.norm(), A / A.norm(), B / B.norm()
        expected += float(0.5 * orth + 0.3 * l2)
        assert_close(layer.lora_A.grad, 0.5 * d_orth + 0.3 * dA_l2, torch.float32)
        assert_close(layer.lora_B.grad, 0.3 * dB_l2, torch.float32)
    assert_close(term, torch.tensor(expected, dtype=torch.float64), torch.float32)


def test_training_with_the_loss_term_moves_the_new_a_off_the_past_ones():
    """train_steps adds loss_term: with λ₁ large the new A's overlap with the past A's falls, with λ₁ = 0
    it stays near where the random init put it."""
    task = conflict_suite(0, n_train=8, n_test=1, n_tasks=1)[0]
    opts = TrainOptions(lr=1e-2, max_steps=8, batch_size=4, warmup_steps=0)
    overlaps = {}
    for lam in (0.0, 50.0):
        cl = _olora(tasks=1, lambda_orth=lam)
        cl.begin_task()

        def overlap(cl=cl) -> float:
            pairs = [(cl.branches.A[n], m.lora_A.detach()) for n, m in cl.layers.items()]
            return sum(float(orthogonality_loss(past, A)) for past, A in pairs)

        before = overlap()
        examples = [(task, ex) for ex in task.train]
        params = cl.trainable_parameters()
        train_steps(cl.model, params, char_codec(), examples, opts, 0, loss_term=cl.loss_term)
        overlaps[lam] = overlap() / before
    assert overlaps[50.0] < 0.5 < 0.8 < overlaps[0.0], overlaps


def test_loss_term_is_none_when_nothing_applies():
    cl = _olora()
    assert cl.loss_term() is None  # outside a task
    cl.begin_task()
    assert cl.loss_term() is None  # task 1, λ₂ = 0: no past A, no L2 term
    cl.end_task()
    cl.begin_task()
    assert cl.loss_term() is not None


def test_summed_frozen_branches_equal_folding_them_into_w():
    cl = _olora(tasks=3, seed=1)
    cl.begin_task()
    fake_training(cl, torch.Generator().manual_seed(9))  # the current task's LoRA is live too
    ids = torch.randint(2, 90, (2, 7))
    with cl.merged():
        with_branches = cl.model(input_ids=ids).logits
    with torch.no_grad():
        for name, layer in cl.layers.items():
            layer.base.weight += cl.branches.delta_weight(name).to(layer.base.weight.dtype)
    cl.close()  # the hooks are off: the past lives in W now
    folded = cl.model(input_ids=ids).logits
    assert_close(with_branches, folded, torch.float32)
    assert cl.branches.A[next(iter(cl.layers))].shape[0] == 3 * LORA.r


def test_end_task_moves_the_lora_into_the_past_and_the_output_is_unchanged():
    cl = _olora(tasks=1)
    cl.begin_task()
    fake_training(cl, torch.Generator().manual_seed(2))
    ids = torch.randint(2, 90, (1, 5))
    before = cl.model(input_ids=ids).logits
    cl.end_task()
    assert all(not layer.lora_B.any() for layer in cl.layers.values())  # not counted twice
    assert_close(cl.model(input_ids=ids).logits, before, torch.float32)
    with mbf.disable_adapter(cl.model):  # the base alone: no branch either
        bare = cl.model(input_ids=ids).logits
    assert (bare - before).abs().max() > 1e-3


def test_peft_export_refuses_a_model_with_past_branches(tmp_path):
    cl = _olora(tasks=1)
    with pytest.raises(ValueError, match="one frozen LoRA per past task"):
        mbf.save_peft_adapter(cl.model, tmp_path / "peft")
    cl.close()  # the branches are off: the model is its own adapter again
    mbf.save_peft_adapter(cl.model, tmp_path / "peft", adapter="finetuned")


def test_memory_grows_with_the_tasks_as_counted_by_hand():
    cl = _olora()
    per_task = sum(LORA.r * (layer.in_features + layer.out_features) * 4 for layer in cl.layers.values())
    for t in range(3):
        assert cl.adapter_bytes() == (t + 1) * per_task  # the current LoRA and t past ones, fp32
        assert cl.optimizer_bytes() == 2 * per_task  # AdamW's two moments of the current LoRA
        cl.begin_task()
        cl.end_task()
    slao = mbf.ContinualLoRA(cl.model)
    assert slao.adapter_bytes() == 2 * per_task and slao.optimizer_bytes() == 2 * per_task


def test_the_protocol_and_the_registry():
    cl = _olora()
    assert isinstance(cl, ContinualStrategy) and isinstance(mbf.ContinualLoRA(cl.model), ContinualStrategy)
    model = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(model, LORA)
    assert type(make_strategy(model, OLoRAConfig())) is OLoRA
    assert type(make_strategy(model, mbf.ContinualConfig())) is mbf.ContinualLoRA
    with pytest.raises(TypeError, match="no strategy takes a dict"):
        make_strategy(model, {})
    with pytest.raises(ValueError, match="unknown option"):
        OLoRA(model, lambda_three=1.0)
    for bad, match in [({"lambda_orth": -1.0}, "lambda_orth=-1.0"), ({"norm": "l3"}, "norm='l3'")]:
        with pytest.raises(ValueError, match=match):
            OLoRAConfig(**bad)


def test_checkpoint_round_trip_checksum_and_strategy_mismatch(tmp_path):
    cl = _olora(tasks=2, lambda_orth=0.25)
    cl.save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / META).read_text())
    assert meta["strategy"] == "o-lora" and meta["strategy_options"]["lambda_orth"] == 0.25
    fresh = tiny_llama(0, hidden_size=48, intermediate_size=80)  # no LoRA yet: the saved config is injected
    back = load_strategy(fresh, tmp_path / "ck")
    assert type(back) is OLoRA and back.task_index == 2 and back.config.lambda_orth == 0.25
    for name in cl.layers:
        assert torch.equal(back.branches.A[name], cl.branches.A[name])
        assert torch.equal(back.branches.B[name], cl.branches.B[name])
    ids = torch.randint(2, 90, (1, 6))
    assert_close(back.model(input_ids=ids).logits, cl.model(input_ids=ids).logits, torch.float32)
    with pytest.raises(ValueError, match="saved by the 'o-lora' strategy, not 'slao'"):
        mbf.ContinualLoRA.load(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")
    with pytest.raises(ValueError, match="cannot continue with a ContinualConfig"):
        load_strategy(fresh, tmp_path / "ck", config=mbf.ContinualConfig())
    tensors = next((tmp_path / "ck").glob("adapters-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_strategy(tiny_llama(0, hidden_size=48, intermediate_size=80), tmp_path / "ck")
    cl.begin_task()
    with pytest.raises(RuntimeError, match="mid-task"):
        cl.save(tmp_path / "mid")


def test_method_registry_and_its_errors():
    assert method_config("o-lora") == OLoRAConfig()
    code = OLoRAConfig(lambda_orth=0.1, norm="code")
    assert method_config("o-lora", options={"lambda_orth": "0.1", "norm": "code"}) == code
    assert method_config("slao", options={"orthogonal_updates": "true"}).orthogonal_updates is True
    with pytest.raises(ValueError, match="--schedule: SLAO's options, not o-lora's"):
        method_config("o-lora", schedule="inverse")
    with pytest.raises(ValueError, match="--option lambda_orth=abc: lambda_orth takes a float"):
        method_config("o-lora", options={"lambda_orth": "abc"})
    with pytest.raises(ValueError, match="o-lora has no option 'rank'"):
        method_config("o-lora", options={"rank": "2"})
    assert method_label("o-lora", OLoRAConfig().to_dict()) == "o-lora"
    assert method_label("o-lora", OLoRAConfig(lambda_orth=0.1).to_dict()) == "o-lora (lambda_orth=0.1)"


OPTS = TrainOptions(lr=5e-3, max_steps=3, batch_size=4, eval_batch_size=4, seed=1)


def _run(out, method, **kw):
    tasks = conflict_suite(0, n_train=12, n_test=4, n_tasks=3)
    model = tiny_llama()
    return run_continual(model, char_codec(), tasks, out, method=method, lora=LORA, opts=OPTS,
                         meta={"suite": "builtin"}, log=kw.pop("log", lambda s: None), **kw)  # fmt: skip


@pytest.mark.parametrize("method", ["o-lora", "inflora"])
def test_resume_equals_uninterrupted_run(tmp_path, method):
    full = _run(tmp_path / "full", method)
    assert full["options"] == method_config(method).to_dict() and full["complete"]
    sizes = [p["adapter_bytes"] for p in full["per_task"]]
    assert sizes[0] < sizes[1] < sizes[2]  # one LoRA more per task (and InfLoRA's memory bases)
    if method == "o-lora":
        assert sizes[1] - sizes[0] == sizes[2] - sizes[1]
    # inference computes with the task's own LoRA too: one adapter, one score per task
    assert full["finetuned_diagonal"] == [full["accuracy"][j][j] for j in range(3)]

    def interrupt_after_task_2(line: str) -> None:
        if "task 2/3" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", method, log=interrupt_after_task_2)
    resumed = _run(tmp_path / "cut", method, resume=True)
    assert resumed["accuracy"] == full["accuracy"]
    assert [p["final_loss"] for p in resumed["per_task"]] == pytest.approx(
        [p["final_loss"] for p in full["per_task"]]
    )


@pytest.mark.parametrize(
    "method, option, options, refused, why",
    [
        ("o-lora", "lambda_orth=0.2", {"lambda_orth": 0.2, "lambda_l2": 0.0, "norm": "paper"}, "lambda_orth",
         "--option lambda_orth: expected NAME=VALUE"),
        ("inflora", "threshold=0.9", {"threshold": 0.9, "threshold_end": 0.0, "tasks": 0}, "threshold=1.5",
         "threshold=1.5 must be in (0, 1)"),
    ],
)  # fmt: skip
def test_cli_runs_each_method_with_an_option(tmp_path, capsys, method, option, options, refused, why):
    model = save_tiny_checkpoint(tmp_path / "tiny")
    run = tmp_path / "run"
    argv = ["continual", "--method", method, "--option", option, "--out", str(run), "--model",
            str(model), "--suite", "conflict", "--n-train", "8", "--n-test", "4", "--max-steps", "2",
            "--batch-size", "4", "--r", "2", "--alpha", "4", "--eval-batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert f"{method}: AA" in capsys.readouterr().out
    res = results_file.read(run)
    assert res["complete"] and res["options"] == options
    sizes = [p["adapter_bytes"] for p in res["per_task"]]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]  # a LoRA (and InfLoRA's bases) more per task
    assert main(["eval", "--run", str(run), "--eval-batch-size", "4"]) == 0  # the saved adapter evaluates
    assert main([*argv[:3], "--option", refused, *argv[5:]]) == 2
    assert why in capsys.readouterr().err
    assert main([*argv[:3], "--schedule", "inverse", *argv[3:]]) == 2
    assert f"--schedule: SLAO's options, not {method}'s" in capsys.readouterr().err


def test_a_continual_lora_made_or_loaded_on_a_model_takes_o_loras_past_branches_off(tmp_path):
    """After O-LoRA drove a model, SLAO on it computes with its own adapter alone: the past tasks'
    frozen LoRAs would otherwise still add their terms without a word; a failed load keeps them."""
    ids = torch.randint(2, 90, (2, 7))
    cl = _olora(tasks=2, seed=3)
    with cl.merged():
        with_branches = cl.model(input_ids=ids).logits
    slao = mbf.ContinualLoRA(cl.model)
    slao.save(tmp_path / "slao")
    with slao.merged():
        own = cl.model(input_ids=ids).logits
    cl.close()  # the same model with O-LoRA's hooks off, its layers as they are
    with slao.merged():
        assert_close(own, cl.model(input_ids=ids).logits, torch.float32)
    assert (own - with_branches).abs().max() > 1e-3  # the branches had changed the output

    r8 = tiny_llama(0, hidden_size=48, intermediate_size=80)
    mbf.inject(r8, mbf.LoRAConfig(r=8, alpha=8))
    mbf.ContinualLoRA(r8).save(tmp_path / "r8")
    other = _olora(tasks=2, seed=4)
    with pytest.raises(ValueError, match="saved LoRAConfig.r=8 but the model was injected with r=4"):
        mbf.ContinualLoRA.load(other.model, tmp_path / "r8")
    with other.merged():
        kept = other.model(input_ids=ids).logits
    other.close()
    with other.merged():
        assert (kept - other.model(input_ids=ids).logits).abs().max() > 1e-3  # its branches still computed
    mbf.ContinualLoRA.load(other.model, tmp_path / "slao")  # a good load takes them off

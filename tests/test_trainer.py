"""The transformers Trainer recipe: one Trainer per task with SLAOCallback, on a tiny Llama (CPU)."""

import pytest
import torch
from conftest import make_tiny_llama, token_examples
from conftest import trainer_args as _args

import mbf

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install mbf-lora[app])")
from mbf.integrations.trainer import INDEX, SHARD, SLAOCallback, adapters_attached  # noqa: E402


class _Stop(Exception):
    pass


def _data(seed: int, n: int = 16, T: int = 10):
    return token_examples(seed, n, T)




def _slao_model():
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model, mbf.ContinualLoRA(model, backend="torch")


def _adapters(cl) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cl.state_dict()["tensors"].items()}


def test_one_trainer_per_task_merges_and_evaluates_with_the_merged_adapter(tmp_path):
    model, cl = _slao_model()
    finetuned = []
    for task in range(2):
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path / f"t{task}"), train_dataset=_data(task),
            eval_dataset=_data(9, n=8), callbacks=[SLAOCallback(cl)],
        )  # fmt: skip
        trainer.train()
        finetuned.append({n: layer.lora_B.detach().clone() for n, layer in cl.layers.items()})
        assert cl.task_index == task + 1 and not cl.in_task
    lam = 1 / 2**0.5
    for name, layer in cl.layers.items():
        want = finetuned[0][name] + lam * (finetuned[1][name] - finetuned[0][name])
        torch.testing.assert_close(layer.merged_B, want, atol=1e-6, rtol=1e-6)
    metrics = trainer.evaluate()
    batch = transformers.default_data_collator(_data(9, n=8))
    with torch.no_grad(), cl.merged():
        want_loss = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want_loss, rel=1e-5)


def test_checkpoints_hold_only_the_adapters_and_a_killed_task_resumes_exactly(tmp_path):
    model, cl = _slao_model()
    transformers.Trainer(
        model=model, args=_args(tmp_path / "t0"), train_dataset=_data(0), callbacks=[SLAOCallback(cl)]
    ).train()  # fmt: skip  task 1, uninterrupted
    reference = _adapters(cl)
    transformers.Trainer(model=model, args=_args(tmp_path / "t1"), train_dataset=_data(1),
                         callbacks=[SLAOCallback(cl)]).train()  # fmt: skip
    want = _adapters(cl)

    class Kill(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Stop  # the process dies during step 3 of task 2

    model2, cl2 = _slao_model()
    cl2.load_state_dict({"task_index": 1, "in_task": False, "tensors": reference})
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    with pytest.raises(_Stop):
        transformers.Trainer(model=model2, args=args, train_dataset=_data(1),
                             callbacks=[SLAOCallback(cl2), Kill()]).train()  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (
        (ckpt / SHARD).is_file() and (ckpt / INDEX).is_file() and (ckpt / "slao" / "continual.json").is_file()
    )
    assert not (ckpt / "model.safetensors").exists()
    base_bytes = sum(p.numel() * p.element_size() for n, p in model2.named_parameters() if "lora_" not in n)
    assert (ckpt / SHARD).stat().st_size < base_bytes / 4

    model3, cl3 = _slao_model()  # a new process: fresh model, fresh SLAO state
    transformers.Trainer(model=model3, args=args, train_dataset=_data(1),
                         callbacks=[SLAOCallback(cl3)]).train(resume_from_checkpoint=True)  # fmt: skip
    assert cl3.task_index == 2 and not cl3.in_task
    got = _adapters(cl3)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    # SLAO's state after each task: a run killed between two trainer.train() calls resumes from it
    between = mbf.ContinualLoRA.load(make_tiny_llama(), tmp_path / "run" / "slao", backend="torch")
    assert between.task_index == 2
    assert all(torch.equal(between.state_dict()["tensors"][k], got[k]) for k in got)


def _peft_logits(folder, ids):
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(make_tiny_llama(), folder).eval()(ids).logits


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_trainer_checkpoints_saves_and_resumes_adapters_only_with_or_without_the_callback(
    tmp_path, with_callback, caplog
):
    """The Trainer's checkpoints, save_model() and resume work on an injected model; no "missing keys"."""
    ids = torch.randint(0, 97, (2, 9))
    model, cl = _slao_model()
    callbacks = [SLAOCallback(cl)] if with_callback else []
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(0), callbacks=callbacks)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    model.eval()
    with torch.no_grad():
        want = model(ids).logits  # what inference uses: merged with the callback, fine-tuned without
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        assert {"adapter_model.safetensors", "adapter_config.json", SHARD, INDEX} <= {
            p.name for p in folder.iterdir()
        }
        assert not (folder / "config.json").exists() and not (folder / "model.safetensors").exists()
    torch.testing.assert_close(_peft_logits(tmp_path / "final", ids), want, atol=1e-5, rtol=1e-5)

    model2, cl2 = _slao_model()  # a new process resumes the Trainer from checkpoint-2
    callbacks = [SLAOCallback(cl2)] if with_callback else []
    if not with_callback:
        cl2.begin_task()
    with caplog.at_level("WARNING", logger="transformers.trainer"):
        transformers.Trainer(model=model2, args=args, train_dataset=_data(0), callbacks=callbacks).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")
        )
    assert "missing keys" not in caplog.text
    for k, v in cl.state_dict()["tensors"].items():
        torch.testing.assert_close(cl2.state_dict()["tensors"][k], v, atol=1e-6, rtol=1e-5)


def test_a_bnb_4bit_model_with_mbf_adapters_trains_under_trainer(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install mbf-lora[qlora])")
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    cl = mbf.ContinualLoRA(model, backend="torch")
    assert all(layer.is_4bit for layer in cl.layers.values())
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=_args(tmp_path / "x"), train_dataset=_data(0))
    with adapters_attached(model):
        trainer = transformers.Trainer(model=model, args=_args(tmp_path / "x"), train_dataset=_data(0),
                                       callbacks=[SLAOCallback(cl)])  # fmt: skip
    assert model.is_quantized
    before = _adapters(cl)
    trainer.train()
    after = _adapters(cl)
    assert cl.task_index == 1
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))

"""Issue 20, the library: what a PEFT / transformers user falls into, each a correct result or a clear error.

What you evaluate is what you export; a folded layer is never used as another adapter; a stale
``ContinualLoRA`` refuses; checkpoints and imports are checked; PEFT's habits are understood.
"""

import json
import warnings

import pytest
import torch
from conftest import fake_training, make_tiny_llama, slao_tasks
from torch import nn

import mbf

_slao, _train = slao_tasks, fake_training


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))


# -- what eval() uses ------------------------------------------------------------------------------------


def test_eval_uses_the_merged_adapter_once_a_task_is_merged_and_the_finetuned_one_is_one_call_away():
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model, backend="torch")
    g = torch.Generator().manual_seed(0)
    cl.begin_task()
    _train(cl, g)
    model.eval()
    with cl.adapter_mode("finetuned"):
        finetuned = _logits(model, IDS)
    torch.testing.assert_close(_logits(model, IDS), finetuned, atol=0, rtol=0)  # task 1: λ = 1
    cl.end_task()
    cl.begin_task()
    _train(cl, g)
    with cl.merged():
        merged_1 = _logits(model, IDS)
    torch.testing.assert_close(_logits(model, IDS), merged_1, atol=0, rtol=0)  # inside task 2: task 1's merge
    cl.end_task()
    with cl.merged():
        merged = _logits(model, IDS)
    with cl.adapter_mode("finetuned"):
        finetuned = _logits(model, IDS)
    assert (merged - finetuned).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, IDS), merged, atol=0, rtol=0)  # eval(): the merged adapter
    model.train()
    torch.testing.assert_close(model(IDS).logits.detach(), finetuned, atol=0, rtol=0)  # train(): fine-tuned
    model.eval()
    cl.set_eval_adapter("finetuned")  # the fine-tuned one, one call away
    torch.testing.assert_close(_logits(model, IDS), finetuned, atol=0, rtol=0)
    cl.set_eval_adapter("auto")
    torch.testing.assert_close(_logits(model, IDS), merged, atol=0, rtol=0)


def test_a_loaded_checkpoint_evaluates_with_the_merged_adapter(tmp_path):
    model = make_tiny_llama()
    cl = _slao(model)
    with cl.merged():
        merged = _logits(model, IDS)
    cl.save(tmp_path / "ckpt")
    fresh = make_tiny_llama()
    mbf.ContinualLoRA.load(fresh, tmp_path / "ckpt", backend="torch")
    torch.testing.assert_close(_logits(fresh.eval(), IDS), merged, atol=0, rtol=0)


def test_set_eval_adapter_refuses_an_unknown_adapter_at_once():
    cl = _slao(make_tiny_llama(), tasks=1)
    with pytest.raises(ValueError, match=r"set_eval_adapter: 'bogus' must be one of"):
        cl.set_eval_adapter("bogus")


# -- folding one adapter, asking for another ---------------------------------------------------------------


def test_a_layer_folded_with_one_adapter_is_never_used_as_the_other():
    model = make_tiny_llama()
    cl = _slao(model)
    name, layer = next(iter(cl.layers.items()))
    layer.fold(adapter="finetuned")
    with pytest.raises(ValueError, match=rf"{name}: the finetuned adapter is folded into the weight"):
        with cl.merged():
            pass
    with pytest.raises(ValueError, match=rf"{name}: .* unfold\(\) it before using the merged one"):
        layer.fold(adapter="merged")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{name}: the finetuned adapter is folded"):
        mbf.eject(model, fold=True, adapter="merged")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layer.fold(adapter="finetuned")  # the same adapter again: nothing to do
    layer.unfold()
    with cl.merged():
        merged = _logits(model.eval(), IDS)
    mbf.eject(model, fold=True, adapter="merged")
    torch.testing.assert_close(_logits(model, IDS), merged, atol=1e-5, rtol=1e-5)


def test_a_merged_export_or_fold_before_any_task_is_refused(tmp_path):
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"no task has been merged yet: the merged adapter is zero"):
        mbf.save_peft_adapter(model, tmp_path / "peft", adapter="merged")
    with pytest.raises(ValueError, match=r"no task has been merged yet: the merged adapter is zero"):
        mbf.eject(model, fold=True, adapter="merged")
    assert mbf.lora_layers(model)  # still injected


# -- a ContinualLoRA that no longer drives the model -------------------------------------------------------


def test_an_old_continual_lora_refuses_after_eject_and_inject():
    model = make_tiny_llama()
    cl = _slao(model, tasks=1)
    mbf.eject(model)
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    for op in (cl.begin_task, lambda: cl.save("never-written")):
        with pytest.raises(RuntimeError, match=r"no longer drives the model: its LoRA layers were ejected"):
            op()


def test_a_second_continual_lora_on_one_model_takes_over_and_the_first_refuses():
    model = make_tiny_llama()
    first = _slao(model, tasks=1)
    second = mbf.ContinualLoRA(model, backend="torch")
    assert second.task_index == 0
    with pytest.raises(RuntimeError, match=r"another ContinualLoRA was created on the same model"):
        first.begin_task()
    second.begin_task()


# -- checkpoints --------------------------------------------------------------------------------------------


def test_save_deletes_only_its_own_previous_tensor_file(tmp_path):
    cl = _slao(make_tiny_llama(), tasks=1)
    user_file = tmp_path / "adapters-0123456789ab.safetensors"
    user_file.write_bytes(b"the user's")
    cl.save(tmp_path)
    first = json.loads((tmp_path / "continual.json").read_text())["tensors_file"]
    cl.save(tmp_path)
    second = json.loads((tmp_path / "continual.json").read_text())["tensors_file"]
    assert user_file.read_bytes() == b"the user's"
    assert not (tmp_path / first).exists() and (tmp_path / second).exists()


@pytest.mark.parametrize("edit", ["delete", "null"])
def test_a_checkpoint_without_its_checksum_is_refused(tmp_path, edit):
    cl = _slao(make_tiny_llama(), tasks=1)
    cl.save(tmp_path)
    meta = json.loads((tmp_path / "continual.json").read_text())
    if edit == "delete":
        del meta["tensors_sha256"]
    else:
        meta["tensors_sha256"] = None
    (tmp_path / "continual.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"continual.json: tensors_sha256=None must be the hex SHA-256"):
        mbf.ContinualLoRA.load(make_tiny_llama(), tmp_path)


# -- NF4 -----------------------------------------------------------------------------------------------------


def test_a_non_finite_weight_is_refused_before_nf4_quantisation():
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"q_proj: weight has 1 non-finite value\(s\), first at \(3, 5\)"):
        mbf.NF4Linear.from_linear(linear, name="layers.0.q_proj")


# -- PEFT's habits and files -------------------------------------------------------------------------------


def test_lora_config_accepts_peft_task_type_and_ignores_it():
    cfg = mbf.LoRAConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")
    assert cfg == mbf.LoRAConfig(r=4, alpha=8) and "task_type" not in cfg.to_dict()
    with pytest.raises(TypeError, match=r"LoRAConfig: unknown argument\(s\) use_dora"):
        mbf.LoRAConfig(use_dora=True)


def _peft_dir(tmp_path, config: dict | str, tensors: dict | None = None):
    from safetensors.torch import save_file

    folder = tmp_path / "peft"
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    save_file(tensors or {}, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_peft_config_without_r_or_with_bad_json_names_the_file(tmp_path):
    folder = _peft_dir(tmp_path, {"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"adapter_config.json: no 'r' \(the LoRA rank\)"):
        mbf.load_peft_adapter(make_tiny_llama(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        mbf.load_peft_adapter(make_tiny_llama(), folder)


def test_non_finite_adapter_tensors_are_not_imported(tmp_path):
    model = make_tiny_llama()
    cl = _slao(model, tasks=1)
    mbf.save_peft_adapter(model, tmp_path / "src")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "src" / "adapter_model.safetensors"))
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match=r"non-finite values"):
        mbf.load_peft_adapter(fresh, tmp_path / "src")
    assert not mbf.lora_layers(fresh) and cl.task_index == 1


def test_the_ablation_field_is_merged_factors_and_older_files_still_load(tmp_path):
    """``ContinualConfig.merge`` is now ``merged_factors`` (``fold()`` folds); old files still load."""
    assert mbf.ContinualConfig.from_dict({"merge": "A"}).merged_factors == "A"
    cl = _slao(make_tiny_llama(), tasks=1)
    cl.save(tmp_path)
    meta = json.loads((tmp_path / "continual.json").read_text())
    meta["config"]["merge"] = meta["config"].pop("merged_factors")  # as a checkpoint from before
    # whose tensor file's metadata held no SHA-256 of continual.json's fields (issue 39 added them)
    from safetensors.torch import load_file, save_file

    from mbf.checkpoint import FORMAT, _sha256

    tensors = tmp_path / meta["tensors_file"]
    save_file(load_file(tensors), tensors, metadata={"mbf": FORMAT})
    meta["tensors_sha256"] = _sha256(tensors)
    (tmp_path / "continual.json").write_text(json.dumps(meta))
    assert mbf.ContinualLoRA.load(make_tiny_llama(), tmp_path).config.merged_factors == "B"
    assert mbf.ContinualLoRA(make_tiny_llama_injected(), merge="AB").config.merged_factors == "AB"


def make_tiny_llama_injected():
    return mbf.inject(make_tiny_llama(), mbf.LoRAConfig(r=4, alpha=8))


def test_training_an_eval_model_after_a_merge_warns_that_nothing_trains():
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model, backend="torch")
    cl.begin_task()
    cl.end_task()
    cl.begin_task()
    model.eval()  # e.g. a model from from_pretrained, never put in train()
    with pytest.warns(UserWarning, match=r"eval\(\) mode compute with the merged adapter.*model\.train\(\)"):
        model(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(IDS)  # evaluating without a gradient is what eval() is for: no warning
        model.train()
        model(IDS).logits.sum().backward()  # training in train(): no warning
    assert all(layer.lora_B.grad is not None for layer in cl.layers.values())

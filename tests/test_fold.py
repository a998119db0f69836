"""Folding after every strategy: ``eject(fold=True)`` and a layer's ``fold()`` give the model that eval()
computes, the past tasks' LoRAs (O-LoRA, InfLoRA) and a merge's dense ΔW (task arithmetic, TIES) included."""

import pytest
import torch
from conftest import assert_close, fake_training, make_tiny_llama, slao_tasks

import mbf
from mbf.strategies.inflora import InfLoRA
from mbf.strategies.olora import OLoRA
from mbf.strategies.sketch import SketchMerge
from mbf.strategies.task_merge import TaskMergeLoRA

METHODS = ["o-lora", "inflora", "task_arithmetic", "ties", "ties-low-rank", "sketch-merge"]


def _strategy(method: str, tasks: int = 2):
    """``method`` over a tiny Llama (r 4 on q, v) after ``tasks`` tasks of ``fake_training``, then a next
    task begun and 'trained' (the current LoRA differs from every finished one)."""
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    if method == "o-lora":
        cl = OLoRA(model)
    elif method == "inflora":
        cl = InfLoRA(model)
    elif method == "sketch-merge":
        cl = SketchMerge(model, rank=6, sketch=8)  # 3 tasks of r 4 truncated to rank 6
    else:
        merge, _, low = method.partition("-")
        cl = TaskMergeLoRA(model, merge=merge, low_rank=bool(low))
    ids = torch.randint(2, 90, (3, 11))
    g = torch.Generator().manual_seed(3)
    for _ in range(tasks + 1):
        if cl.wants_inputs:
            cl.observe_inputs(lambda: model(input_ids=ids))
        cl.begin_task()
        fake_training(cl, g)
        if cl.task_index == tasks:
            break
        if cl.wants_inputs:
            cl.observe_inputs(lambda: model(input_ids=ids))
        cl.end_task()
    return model, cl


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("method", METHODS)
def test_eject_fold_gives_what_eval_computes_after_every_strategy(method):
    ids = torch.randint(0, 97, (2, 7))
    model, cl = _strategy(method)
    model.eval()
    want = _logits(model, ids)
    with mbf.disable_adapter(model):
        bare = _logits(model, ids)
    assert (want - bare).abs().max() > 1e-2  # the adapters matter
    mbf.eject(model, fold=True)
    assert not mbf.lora_layers(model)
    assert_close(_logits(model, ids), want, torch.float32)


@pytest.mark.parametrize("method", METHODS)
def test_fold_of_every_layer_keeps_the_eval_output_and_unfold_gives_it_back(method):
    ids = torch.randint(0, 97, (2, 7))
    model, cl = _strategy(method)
    model.eval()
    want = _logits(model, ids)
    weights = {n: layer.base.weight.detach().clone() for n, layer in cl.layers.items()}
    for layer in cl.layers.values():
        layer.fold()  # the adapter the forward uses now, and whatever the strategy adds to it
    assert_close(_logits(model, ids), want, torch.float32)
    for layer in cl.layers.values():
        layer.unfold()
    assert_close(_logits(model, ids), want, torch.float32)
    for name, layer in cl.layers.items():
        assert_close(layer.base.weight, weights[name], torch.float32)
    for layer in cl.layers.values():  # folded layer by layer, then ejected: the same model
        layer.fold()
    mbf.eject(model, fold=True)
    assert_close(_logits(model, ids), want, torch.float32)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_task_merge_folds_its_own_lora_alone_when_asked(method):
    """``adapter="finetuned"``: the current task's LoRA alone, as ``adapter_mode("finetuned")`` computes."""
    ids = torch.randint(0, 97, (2, 7))
    model, cl = _strategy(method)
    with cl.adapter_mode("finetuned"):
        want = _logits(model, ids)
    mbf.eject(model, fold=True, adapter="finetuned")
    assert_close(_logits(model, ids), want, torch.float32)


def test_after_close_the_past_branches_are_not_folded():
    """``cl.close()`` takes the past tasks' LoRAs off the model: a fold after it folds what computes then."""
    ids = torch.randint(0, 97, (2, 7))
    model, cl = _strategy("o-lora")
    cl.close()
    want = _logits(model, ids)
    mbf.eject(model, fold=True)
    assert_close(_logits(model, ids), want, torch.float32)


def test_slao_still_folds_its_merged_adapter():
    ids = torch.randint(0, 97, (2, 7))
    model = make_tiny_llama()
    cl = slao_tasks(model)
    model.eval()
    want = _logits(model, ids)
    with cl.merged():
        assert_close(_logits(model, ids), want, torch.float32)
    mbf.eject(model, fold=True)
    assert_close(_logits(model, ids), want, torch.float32)

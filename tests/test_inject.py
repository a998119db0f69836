"""inject / eject on a tiny random LlamaForCausalLM."""

import pytest
import torch

import mbf


def test_outputs_unchanged_at_init_and_only_lora_trains(tiny_llama):
    ids = torch.randint(0, 97, (2, 11))
    before = tiny_llama(ids).logits
    mbf.inject(tiny_llama, mbf.LoRAConfig(r=4, alpha=8))
    layers = mbf.lora_layers(tiny_llama)
    assert sorted(layers) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    torch.testing.assert_close(tiny_llama(ids).logits, before)  # B = 0
    tiny_llama(ids).logits.square().mean().backward()
    with_grad = {n for n, p in tiny_llama.named_parameters() if p.grad is not None}
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith(("lora_A", "lora_B")) for n in with_grad)


def test_all_linear_and_eject_restores(tiny_llama):
    ids = torch.randint(0, 97, (1, 9))
    originals = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    before = tiny_llama(ids).logits
    mbf.inject(tiny_llama, mbf.LoRAConfig(r=2, target_modules="all-linear"))
    assert len(mbf.lora_layers(tiny_llama)) == 7 * 2
    for layer in mbf.lora_layers(tiny_llama).values():
        torch.nn.init.normal_(layer.lora_B)
    assert not torch.allclose(tiny_llama(ids).logits, before)
    mbf.eject(tiny_llama)
    after = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    assert after.keys() == originals.keys() and all(after[n] is originals[n] for n in after)
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
    torch.testing.assert_close(tiny_llama(ids).logits, before)


def test_eject_with_merge_folds_the_adapter(tiny_llama):
    ids = torch.randint(0, 97, (1, 9))
    mbf.inject(tiny_llama, mbf.LoRAConfig(r=2, target_modules=("o_proj", "down_proj")))
    for layer in mbf.lora_layers(tiny_llama).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    with torch.no_grad():
        adapted = tiny_llama(ids).logits
    mbf.eject(tiny_llama, fold=True)
    assert not mbf.lora_layers(tiny_llama)
    torch.testing.assert_close(tiny_llama(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_unknown_target_lists_available_names(tiny_llama):
    with pytest.raises(ValueError, match=r"'qkv' not found; available linear names: down_proj, gate_proj"):
        mbf.inject(tiny_llama, mbf.LoRAConfig(target_modules=("q_proj", "qkv")))


def test_double_inject_is_an_error(tiny_llama):
    mbf.inject(tiny_llama, mbf.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        mbf.inject(tiny_llama, mbf.LoRAConfig(r=2))


def test_rank_error_names_the_layer(tiny_llama):
    # k_proj of the tiny model is 48 -> 24: rank 30 does not fit
    match = r"model.layers.0.self_attn.k_proj: rank 30 must be an integer in \[1, 24\]"
    with pytest.raises(ValueError, match=match):
        mbf.inject(tiny_llama, mbf.LoRAConfig(r=30, target_modules=("k_proj",)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), r"LoRAConfig: rank 0 must be an integer in \[1, ∞\)"),
        (dict(alpha=0), "alpha=0 must be a finite number > 0"),
        (dict(alpha=float("inf")), "alpha=inf must be a finite number > 0"),
        (dict(dropout=-0.1), r"dropout -0.1 must be in \[0, 1\)"),
        (dict(target_modules=()), r"target_modules=\(\) must be a non-empty list of module names"),
        (dict(target_modules="q_proj("), "is not a valid regex"),
        (dict(alpha=8, lora_alpha=16), "alpha=8 and lora_alpha=16 disagree"),
        (dict(quantize="fp4"), "quantize='fp4' must be None or 'nf4'"),
        (dict(backend="cuda"), "backend='cuda' must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mbf.LoRAConfig(**kwargs)


def test_failed_inject_leaves_the_model_untouched(tiny_llama):
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    with pytest.raises(ValueError, match="rank 30"):
        mbf.inject(tiny_llama, mbf.LoRAConfig(r=30, target_modules=("q_proj", "k_proj")))
    assert not mbf.lora_layers(tiny_llama)
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags

"""PEFT in: a saved PEFT LoRA adapter or a live PeftModel becomes mbf's layers computing the same logits."""

import json

import pytest
import torch
from conftest import make_tiny_llama

import mbf
from mbf.integrations.peft import lora_config_from_peft

peft = pytest.importorskip("peft", reason="peft is not installed (pip install mbf-lora[app])")


def _trained_peft(model, **config):
    """A PeftModel whose B is random (a trained adapter, not PEFT's zero init)."""
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config})
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return pm.eval()


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def test_load_peft_adapter_gives_peft_logits_and_counts_as_task_one(tmp_path):
    ids = torch.randint(0, 97, (2, 9))
    pm = _trained_peft(make_tiny_llama())
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")
    model = mbf.load_peft_adapter(make_tiny_llama(), tmp_path / "adapter")
    assert sorted(n.rpartition(".")[2] for n in mbf.lora_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    cl = mbf.ContinualLoRA(model)
    cl.begin_task()
    cl.end_task()  # the imported adapter is task 1: merged = fine-tuned (λ(1) = 1)
    with cl.merged():
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    cl.begin_task()  # task 2 starts from its orthonormalised rows, as SLAO prescribes
    assert cl.task_index == 1 and cl.in_task


def test_from_peft_converts_a_live_peft_model():
    ids = torch.randint(0, 97, (2, 9))
    pm = _trained_peft(make_tiny_llama(), target_modules=r".*\.layers\.1\..*(q|o)_proj", lora_dropout=0.1)
    want = _logits(pm, ids)
    model = mbf.from_peft(pm)
    layers = mbf.lora_layers(model)
    assert sorted(layers) == ["model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.q_proj"]
    assert all(layer.lora_dropout == 0.1 and layer.scaling == 2.0 for layer in layers.values())
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


def test_all_linear_by_module_type_on_another_architecture():
    """OPT's linears are q/k/v/out_proj, fc1, fc2 and lm_head: all but the output embedding."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, ffn_dim=48, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=32)  # fmt: skip
    model = OPTForCausalLM(cfg).eval()
    mbf.inject(model, mbf.LoRAConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    leaves = sorted({n.rpartition(".")[2] for n in mbf.lora_layers(model)})
    assert leaves == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    mbf.eject(model)
    mbf.inject(model, mbf.LoRAConfig(r=2, target_modules="all-linear", exclude_modules=["fc1", "fc2"]))
    assert sorted({n.rpartition(".")[2] for n in mbf.lora_layers(model)}) == [
        "k_proj",
        "out_proj",
        "q_proj",
        "v_proj",
    ]


def test_peft_target_forms_and_names():
    model = make_tiny_llama()
    mbf.inject(
        model, mbf.LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=["self_attn.q_proj"])
    )
    assert sorted(mbf.lora_layers(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    cfg = model.mbf_lora_config
    assert (cfg.alpha, cfg.lora_alpha, cfg.dropout, cfg.lora_dropout) == (4, 4, 0.05, 0.05)
    with pytest.raises(ValueError, match=r"a string is a regex on the whole qualified name"):
        mbf.inject(make_tiny_llama(), mbf.LoRAConfig(target_modules="q_proj"))
    with pytest.raises(ValueError, match="'qkv' not found"):
        mbf.inject(make_tiny_llama(), mbf.LoRAConfig(target_modules=["q_proj", "qkv"]))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("use_dora", True, "DoRA"),
        ("use_rslora", True, r"rsLoRA \(scaling alpha / sqrt\(r\)\)"),
        ("rank_pattern", {"q_proj": 8}, "per-module ranks"),
        ("bias", "all", "trains biases"),
        ("peft_type", "IA3", "only LoRA adapters"),
    ],
)
def test_unsupported_peft_options_are_refused(tmp_path, field, value, match):
    pm = _trained_peft(make_tiny_llama())
    pm.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data[field] = value
    config_file.write_text(json.dumps(data))
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match=match):
        mbf.load_peft_adapter(fresh, tmp_path / "adapter")
    assert not mbf.lora_layers(fresh)


def test_inject_refuses_a_peft_model_and_a_mismatched_adapter_leaves_the_model_alone(tmp_path):
    pm = _trained_peft(make_tiny_llama())
    with pytest.raises(ValueError, match=r"carries PEFT LoRA layers: convert it with mbf\.from_peft"):
        mbf.inject(pm, mbf.LoRAConfig(target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "adapter")
    other = make_tiny_llama(num_key_value_heads=4)  # v_proj 48 -> 48: the saved B does not fit
    with pytest.raises(ValueError, match=r"v_proj\.lora_B has shape \(24, 4\), the layer \(48, 4\)"):
        mbf.load_peft_adapter(other, tmp_path / "adapter")
    assert not mbf.lora_layers(other)
    assert lora_config_from_peft(pm.peft_config["default"]).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "targets, exclude",
    [
        (["q_proj", "v_proj"], None),
        (["self_attn.q_proj"], None),
        (r".*\.layers\.0\.self_attn\.(q|v)_proj", None),
        (["q_proj", "v_proj"], ["model.layers.1.self_attn.q_proj"]),
        ("all-linear", None),
        ("all-linear", r".*mlp.*"),
    ],
)
def test_the_peft_export_selects_exactly_the_exported_layers_and_round_trips(tmp_path, targets, exclude):
    """Every targeting form: mbf.load_peft_adapter and PeftModel rebuild the same layers and logits."""
    import warnings

    ids = torch.randint(0, 97, (2, 9))
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=targets, exclude_modules=exclude))
    with torch.no_grad():
        for layer in mbf.lora_layers(model).values():
            layer.lora_B.normal_()
    want, names = _logits(model, ids), set(mbf.lora_layers(model))
    mbf.save_peft_adapter(model, tmp_path)

    back = mbf.load_peft_adapter(make_tiny_llama(), tmp_path)
    assert set(mbf.lora_layers(back)) == names
    torch.testing.assert_close(_logits(back, ids), want, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing or unexpected adapter keys
        pm = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    peft_names = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert peft_names == names
    torch.testing.assert_close(_logits(pm, ids), want, atol=1e-5, rtol=1e-5)

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
        ("kasa_config", {"k": 1}, r"KaSA \(kasa_config="),
        ("arrow_config", {"top_k": 2}, r"Arrow routing \(arrow_config="),
        ("monteclora_config", {"n": 1}, r"MonteCLoRA \(monteclora_config="),
        ("velora_config", {"rank": 1}, r"VeLoRA \(velora_config="),
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


def _saved_peft(tmp_path, **config):
    pm = _trained_peft(make_tiny_llama(), **config)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(folder, **fields):
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_changed_the_base_is_refused_naming_the_field(tmp_path, init):
    """PiSSA and OLoRA subtract their initial LoRA from the base weights (PEFT redoes it on load): A and B
    alone, added to the untouched base, compute something else (7.11 / 11.85 logits away); refused."""
    ids = torch.randint(0, 97, (2, 9))
    folder = _saved_peft(tmp_path, init_lora_weights=init)
    want = _logits(peft.PeftModel.from_pretrained(make_tiny_llama(), folder).eval(), ids)
    _edit_config(folder, init_lora_weights=True)  # the same A and B on the untouched base: not PEFT's model
    plain = mbf.load_peft_adapter(make_tiny_llama(), folder)
    assert (_logits(plain, ids) - want).abs().max() > 0.1
    _edit_config(folder, init_lora_weights=init)
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match=rf"json: .*init_lora_weights={init!r}.*changes the base"):
        mbf.load_peft_adapter(fresh, folder)
    assert not mbf.lora_layers(fresh)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_live_peft_model_whose_init_changed_the_base_converts_with_its_logits(init):
    """``from_peft`` keeps the live model's (residual) base weights: it computes what the PeftModel did."""
    ids = torch.randint(0, 97, (2, 9))
    pm = _trained_peft(make_tiny_llama(), init_lora_weights=init)
    want = _logits(pm, ids)
    torch.testing.assert_close(_logits(mbf.from_peft(pm), ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "astra", "loftq", "lora_ga", "some_new_init", 3])
def test_every_other_init_that_is_not_plain_lora_on_the_base_is_refused(tmp_path, init):
    folder = _saved_peft(tmp_path)
    _edit_config(folder, init_lora_weights=init)
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match=rf"init_lora_weights={init!r}"):
        mbf.load_peft_adapter(fresh, folder)
    assert not mbf.lora_layers(fresh)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "nora", "mica"])
def test_an_init_that_leaves_the_base_alone_imports_with_peft_logits(tmp_path, init):
    """These inits only draw A and B (trained afterwards): PEFT loads the adapter on the untouched base."""
    import warnings

    ids = torch.randint(0, 97, (2, 9))
    folder = _saved_peft(tmp_path)
    _edit_config(folder, init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "eva" without eva_config warns
        want = _logits(peft.PeftModel.from_pretrained(make_tiny_llama(), folder).eval(), ids)
    model = mbf.load_peft_adapter(make_tiny_llama(), folder)
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["lora_alpha", "r"])
def test_a_null_alpha_or_rank_is_refused_naming_the_field(tmp_path, field):
    """``"lora_alpha": null`` used to import as mbf's default 16; PEFT's 8 applies only when the field is
    absent (PEFT itself fails on null: ``None / r``)."""
    folder = _saved_peft(tmp_path)
    _edit_config(folder, **{field: None})
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match=rf"adapter_config.json: {field}=None"):
        mbf.load_peft_adapter(fresh, folder)
    assert not mbf.lora_layers(fresh)

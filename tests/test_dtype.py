"""The base model's dtype: ``auto`` measured on the CPU (``mbf.experiment.cpu_dtype``: a fake timer decides
in both directions whatever the flags say, the margin, the cache and its key, a malformed cache, the real
timer), bad input, fp32 adapters and optimizer state over a 16-bit base, checkpoints across dtypes, and
QLoRA with a 16-bit compute dtype."""

import json
import warnings

import pytest
import torch
from conftest import assert_close, make_tiny_llama
from fixtures.tiny import tiny_llama

import mbf
from mbf.experiment import cpu_dtype, models
from mbf.inject import lora_layers

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
X86_NONE = {"architecture": "x86_64", "avx2": True, "avx512_f": True}  # AVX-512 without its bf16/fp16 parts
TINY = ((8, 16), (16, 8))  # the real timer's shapes: a few ms in all
XEON = {"float32": 2230.0, "bfloat16": 3084.0, "float16": 30000.0}  # a step's ms on the 2-core Xeon
EPYC = {"float32": 3084.0, "bfloat16": 2230.0, "float16": 30000.0}


def _capabilities(monkeypatch, **flags):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**X86_NONE, **flags})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """An empty dtype cache of this test's own and no answer in memory; returns the cache folder."""
    folder = tmp_path / "dtype-cache"
    monkeypatch.setenv(cpu_dtype.ENV_FOLDER, str(folder))
    monkeypatch.delenv(cpu_dtype.ENV_REMEASURE, raising=False)
    monkeypatch.setattr(cpu_dtype, "_CHOICES", {})
    return folder


class FakeTimer:
    """ms of a probe from a table of a round's ms per dtype (a Llama's one decoder-layer probe, or spread
    over the linears); never runs it.
    ``calls`` records each probe timed, in order."""

    def __init__(self, ms: dict[str, float]):
        self.ms, self.calls = ms, []

    def __call__(self, probe) -> float:
        self.calls.append((probe.dtype, probe.shape))
        return self.ms[probe.dtype] / (1 if probe.shape == "layer" else len(self.shapes))

    shapes = cpu_dtype.SMOLLM2_SHAPES


def _fake(monkeypatch, ms: dict[str, float]) -> FakeTimer:
    timer = FakeTimer(ms)
    monkeypatch.setattr(cpu_dtype, "wall_timer", timer)  # what auto_dtype measures with
    return timer


@pytest.mark.parametrize(
    "flags, fast",
    [
        ({}, {FP32}),
        ({"avx512_bf16": True}, {FP32, BF16}),
        ({"amx_bf16": True, "amx_tile": True}, {FP32, BF16}),
        ({"avx512_fp16": True}, {FP32, FP16}),
        ({"amx_bf16": True, "amx_fp16": True}, {FP32, BF16, FP16}),
    ],
)
def test_the_flags_are_read_from_torchs_cpu_capabilities(monkeypatch, flags, fast):
    _capabilities(monkeypatch, **flags)
    assert models.cpu_fast_dtypes() == fast


def test_no_16_bit_instructions_without_onednn(monkeypatch):
    _capabilities(monkeypatch, avx512_bf16=True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # no 16-bit CPU GEMMs
    assert models.cpu_fast_dtypes() == {FP32}


@pytest.mark.parametrize(
    "flags, ms, expected",
    [
        ({"avx512_bf16": True}, XEON, FP32),  # the flag says bf16 is "fast"; the clock says otherwise
        ({"amx_bf16": True, "avx512_bf16": True}, XEON, FP32),
        ({"avx512_bf16": True}, EPYC, BF16),
        ({}, EPYC, BF16),  # no flag, but measured faster: measured wins
        ({}, {"float32": 3000.0, "bfloat16": 2900.0, "float16": 2000.0}, FP16),  # the fastest 16-bit one
    ],
)
def test_auto_on_cpu_is_the_faster_dtype_measured_whatever_the_flags_say(
    monkeypatch, probe, capsys, flags, ms, expected
):
    _capabilities(monkeypatch, **flags)
    timer = _fake(monkeypatch, ms)
    assert models.auto_dtype("cpu") == expected
    assert timer.calls  # measured
    name = str(expected).removeprefix("torch.")
    err = capsys.readouterr().err
    assert (
        err.startswith(f"mbf: --dtype auto chose {name} on {cpu_dtype.cpu_name()}, ") and err.count("\n") == 1
    )
    assert f"float32 {ms['float32']:,.1f} ms" in err and f"cached in {probe}" in err
    assert models.auto_dtype("cpu") == expected and capsys.readouterr().err == ""  # once a process


@pytest.mark.parametrize(
    "bf16, expected", [(100.0, FP32), (96.0, FP32), (95.3, FP32), (95.0, BF16), (50.0, BF16), (200.0, FP32)]
)
def test_float32_stays_unless_a_16_bit_dtype_is_faster_by_the_margin(monkeypatch, probe, bf16, expected):
    assert cpu_dtype.MARGIN == 0.05  # float32 at 100 ms: bf16 must be under 100 / 1.05 = 95.24 ms
    _fake(monkeypatch, {"float32": 100.0, "bfloat16": bf16, "float16": 1000.0})
    assert cpu_dtype.cpu_dtype(report=None).dtype == expected
    assert cpu_dtype.pick({"float32": 100.0}) == "float32"


def test_the_candidates_are_interleaved_and_an_emulated_one_is_dropped_early(monkeypatch, probe):
    timer = _fake(monkeypatch, {"float32": 70.0, "bfloat16": 35.0, "float16": 700.0})
    choice = cpu_dtype.cpu_dtype(report=None)
    n = 1  # a Llama's shapes: one decoder-layer probe per dtype
    assert choice.dtype == BF16 and choice.ms == pytest.approx({"float32": 70.0, "bfloat16": 35.0})
    assert "float16" in choice.dropped and "over 3x slower than float32" in choice.dropped["float16"]
    dtypes = [d for d, _ in timer.calls]
    # the warm-up: float32 first, then bf16, then fp16 dropped at its first probe (10x float32's)
    assert dtypes[: 2 * n + 1] == ["float32"] * n + ["bfloat16"] * n + ["float16"]
    rounds = [dtypes[2 * n + 1 + 2 * n * r :][: 2 * n : n] for r in range(cpu_dtype.ROUNDS)]
    assert rounds == [["float32", "bfloat16"], ["bfloat16", "float32"]] * 2 + [["float32", "bfloat16"]]
    assert len(dtypes) == 2 * n * (cpu_dtype.ROUNDS + 1) + 1
    assert [s for _, s in timer.calls[:n]] == ["layer"]


def test_the_median_of_the_rounds_is_kept(monkeypatch, probe):
    # warm-up f32 bf16 | f32 bf16 | bf16 f32 | f32 bf16 | bf16 f32 | f32 bf16 (the order rotates)
    rounds = iter([90.0, 30.0, 100.0, 40.0, 250.0, 95.0, 99.0, 41.0, 42.0, 97.0, 98.0, 43.0])

    def timer(p):  # a whole round in the first linear's call, nothing in the others
        return next(rounds) if p.shape == TINY[0] else 0.0

    ms, dropped = cpu_dtype.measure(TINY, timer=timer, candidates=("float32", "bfloat16"))
    assert ms == {"float32": 98.0, "bfloat16": 42.0} and dropped == {}  # medians of rounds 1-5 (250: noise)


def test_the_answer_is_cached_and_read_back_without_timing_again(monkeypatch, probe, capsys):
    _fake(monkeypatch, XEON)
    first = cpu_dtype.cpu_dtype()
    assert first.measured and first.path.parent == probe and first.path.is_file()
    saved = json.loads(first.path.read_text())
    assert saved["dtype"] == "float32" and saved["ms"] == pytest.approx({"float32": 2230, "bfloat16": 3084})
    assert saved["key"]["cpu"] == cpu_dtype.cpu_name() and saved["key"]["torch"] == torch.__version__
    assert saved["key"]["cores"] == cpu_dtype.cpu_cores() and "float16" in saved["dropped"]
    assert saved["threads"] == torch.get_num_threads()
    capsys.readouterr()

    def no_timing(p):
        raise AssertionError("timed again")

    monkeypatch.setattr(cpu_dtype, "wall_timer", no_timing)
    cpu_dtype.forget()  # a new process: only the disk remembers
    again = cpu_dtype.cpu_dtype()
    assert (
        not again.measured and again.dtype == FP32 and again.ms == first.ms and again.dropped == first.dropped
    )
    assert capsys.readouterr().err == ""  # the line is printed when measured, not when read
    assert models.auto_dtype("cpu") == FP32


@pytest.mark.parametrize(
    "change",
    [
        lambda mp: mp.setattr(cpu_dtype, "cpu_name", lambda: "Another CPU"),
        lambda mp: mp.setattr(torch, "__version__", "9.9.9"),
        lambda mp: mp.setattr(cpu_dtype, "_version", lambda dist: "9.9.9"),  # another mbf
        lambda mp: mp.setattr(cpu_dtype, "cpu_cores", lambda: 64),
    ],
    ids=["cpu", "torch", "mbf", "cores"],
)
def test_another_cpu_core_count_or_version_measures_again(monkeypatch, probe, change):
    _fake(monkeypatch, XEON)
    first = cpu_dtype.cpu_dtype(report=None)
    cpu_dtype.forget()
    with monkeypatch.context() as mp:
        change(mp)
        timer = _fake(mp, EPYC)
        other = cpu_dtype.cpu_dtype(report=None)
        assert other.measured and timer.calls and other.dtype == BF16 and other.path != first.path
    cpu_dtype.forget()
    assert cpu_dtype.cpu_dtype(report=None).dtype == FP32  # the first key's file is still there
    assert len(list(probe.glob("*.json"))) == 2


def test_other_shapes_are_another_measurement(monkeypatch, probe):
    _fake(monkeypatch, XEON)
    cpu_dtype.cpu_dtype(report=None)
    timer = _fake(monkeypatch, EPYC)
    assert cpu_dtype.cpu_dtype(TINY, report=None).dtype == BF16 and timer.calls


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"key": {"cpu": "elsewhere"}, "dtype": "bfloat16", "ms": {"float32": 1, "bfloat16": 2}}',
        "KEY",  # the right key, no ms
        'KEY, "dtype": "bfloat16", "ms": {"float32": 2230, "bfloat16": -1}}',
        'KEY, "dtype": "float16", "ms": {"float32": 2230, "bfloat16": 3084}}',
        'KEY, "dtype": "float32", "ms": {"bfloat16": 3084}}',
    ],
)
def test_a_malformed_cache_is_ignored_with_a_warning_naming_it_and_measured_again(monkeypatch, probe, text):
    _fake(monkeypatch, XEON)
    path = cpu_dtype.cpu_dtype(report=None).path
    key = json.dumps(json.loads(path.read_text())["key"])
    path.write_text(text.replace("KEY", '{"key": ' + key + ("}" if text == "KEY" else "")))
    cpu_dtype.forget()
    timer = _fake(monkeypatch, EPYC)
    with pytest.warns(RuntimeWarning, match=f"{path}: dtype cache ignored .*; measuring again"):
        again = cpu_dtype.cpu_dtype(report=None)
    assert again.measured and timer.calls and again.dtype == BF16
    assert json.loads(path.read_text())["dtype"] == "bfloat16"  # rewritten


def test_the_line_can_be_sent_elsewhere_until_the_model_loaded(monkeypatch, probe, capsys):
    _fake(monkeypatch, XEON)
    lines = []
    with cpu_dtype.report_to(lines.append):  # what the CLI does around load_model
        assert models.auto_dtype("cpu") == FP32
    assert len(lines) == 1 and lines[0].startswith("mbf: --dtype auto chose float32")
    assert capsys.readouterr().err == ""
    cpu_dtype.cpu_dtype(remeasure=True)
    assert capsys.readouterr().err.startswith("mbf: --dtype auto chose float32")  # stderr again


def test_remeasure_ignores_the_disk_cache_once(monkeypatch, probe):
    _fake(monkeypatch, XEON)
    cpu_dtype.cpu_dtype(report=None)
    cpu_dtype.forget()
    monkeypatch.setenv(cpu_dtype.ENV_REMEASURE, "1")
    timer = _fake(monkeypatch, EPYC)
    assert cpu_dtype.cpu_dtype(report=None).dtype == BF16 and timer.calls
    timer.calls.clear()
    assert cpu_dtype.cpu_dtype(report=None).dtype == BF16 and not timer.calls  # once a process
    assert cpu_dtype.cpu_dtype(remeasure=True, report=None).measured and timer.calls


def test_under_torch_compile_nothing_is_timed(monkeypatch, probe):
    timer = _fake(monkeypatch, EPYC)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cpu_dtype.cpu_dtype(report=None).dtype == FP32 and not timer.calls
    assert not list(probe.glob("*.json"))


def test_the_real_timer_on_tiny_shapes_returns_a_candidate_and_writes_the_cache(probe):
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    choice = cpu_dtype.cpu_dtype(TINY, tokens=16, report=None)
    assert torch.equal(torch.rand(3), want)  # the caller's random stream is untouched
    assert choice.measured and choice.dtype in (FP32, BF16, FP16) and choice.name in choice.ms
    assert "float32" in choice.ms and set(choice.ms) | set(choice.dropped) == set(cpu_dtype.CANDIDATES)
    assert all(0 < ms < 1000 for ms in choice.ms.values())
    saved = json.loads(choice.path.read_text())
    assert saved["dtype"] == choice.name and saved["key"]["shapes"] == [list(s) for s in TINY]


def test_llama_shapes_of_smollm2_are_the_default():
    config = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert cpu_dtype.llama_shapes(config) == cpu_dtype.SMOLLM2_SHAPES
    tiny = make_tiny_llama().config
    h, i = tiny.hidden_size, tiny.intermediate_size
    assert cpu_dtype.llama_shapes(tiny)[4:] == ((h, i), (h, i), (i, h))


@pytest.mark.parametrize("native, expected", [(True, BF16), (False, FP32)])
def test_auto_on_cuda_follows_native_bf16(monkeypatch, native, expected):
    seen = {}

    def is_bf16_supported(including_emulation=True):
        seen["emulation"] = including_emulation
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert models.auto_dtype("cuda") == expected and seen == {"emulation": False}


def test_resolve_dtype_accepts_names_and_torch_dtypes_only(monkeypatch, probe):
    _fake(monkeypatch, EPYC)
    assert models.resolve_dtype("auto") == BF16
    assert [models.resolve_dtype(n) for n in ("float32", "bfloat16", "float16")] == [FP32, BF16, FP16]
    assert models.resolve_dtype(torch.bfloat16) == BF16
    for bad in ("bf16", "float64", torch.int8, None):
        with pytest.raises(ValueError, match=r"dtype .* must be one of auto, float32, bfloat16, float16"):
            models.resolve_dtype(bad)


def test_a_slow_16_bit_dtype_gets_a_message_naming_the_cost(monkeypatch, probe):
    # before any measurement: the flags (a CPU without the instructions emulates the products)
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({FP32, BF16}))
    msg = models.slow_dtype_message(FP16, "cpu")
    assert "float16" in msg and "AVX-512-FP16" in msg and "slower than float32" in msg
    assert models.slow_dtype_message(BF16, "cpu") is None and models.slow_dtype_message(FP32, "cpu") is None
    assert models.slow_dtype_message(FP16, "cuda") is None
    # once measured: the measurement, whatever the flags say
    _fake(monkeypatch, XEON)
    cpu_dtype.cpu_dtype(report=None)
    msg = models.slow_dtype_message(BF16, "cpu")
    assert "bfloat16 on this CPU: measured 1.38x slower than float32" in msg and "3,084.0 ms" in msg
    assert "over 3x slower than float32" in models.slow_dtype_message(FP16, "cpu")
    assert models.slow_dtype_message(FP32, "cpu") is None
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({FP32}))
    monkeypatch.setattr(cpu_dtype, "_CHOICES", {})
    _fake(monkeypatch, EPYC)
    cpu_dtype.cpu_dtype(remeasure=True, report=None)
    assert models.slow_dtype_message(BF16, "cpu") is None  # no flag, measured faster: not slow


def _tiny_checkpoint(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    make_tiny_llama().save_pretrained(path)
    tok = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    return path


def test_load_model_takes_the_dtype_and_warns_when_it_is_slow(monkeypatch, probe, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "tiny")
    timer = _fake(monkeypatch, XEON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 and auto (here fp32): no warning at all
        assert models.load_model(ckpt, dtype="auto")[0].dtype == FP32
        assert models.load_model(ckpt, dtype=FP32)[0].dtype == FP32
    shapes = models.llama_shapes(make_tiny_llama().config)
    assert {s for _, s in timer.calls} == set(shapes)  # auto measured the checkpoint's own linears
    with pytest.warns(models.SlowDtypeWarning, match="bfloat16 on this CPU: measured 1.38x slower"):
        model, tok = models.load_model(ckpt, dtype="bfloat16")
    assert model.dtype == BF16 and tok.pad_token is not None
    with pytest.raises(ValueError, match="dtype 'half'"):
        models.load_model(ckpt, dtype="half")
    timer.calls.clear()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path / "missing", dtype="auto")
    assert not timer.calls  # a missing checkpoint fails before anything is measured


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_adapters_gradients_and_optimizer_state_stay_fp32_over_a_16_bit_base(dtype):
    model = make_tiny_llama().to(dtype)
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model)
    ids = torch.randint(2, 90, (2, 9))
    model.train()  # eval() computes with the merged adapter once a task is merged: it would train nothing
    for _ in range(2):  # two tasks: the QR init and the merge run on the 16-bit model too
        cl.begin_task()
        opt = torch.optim.AdamW(cl.trainable_parameters(), lr=1e-2)
        for _ in range(2):
            logits = model(input_ids=ids).logits
            assert logits.dtype == dtype
            logits.float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        states = [t for s in opt.state.values() for t in s.values() if t.is_floating_point() and t.dim()]
        assert len(states) == 2 * len(cl.trainable_parameters())  # exp_avg, exp_avg_sq of each
        assert all(t.dtype == FP32 for t in states)
        cl.end_task()
    for layer in cl.layers.values():
        assert layer.base.weight.dtype == dtype
        assert {getattr(layer, k).dtype for k in ("lora_A", "lora_B", "merged_A", "merged_B")} == {FP32}
        assert layer.merged_B.abs().sum() > 0  # trained and merged, not the zero init


def _trained(model, seed=1):
    """``model`` with two SLAO tasks' worth of random adapters; the ContinualLoRA."""
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8))
    cl = mbf.ContinualLoRA(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        cl.begin_task()
        with torch.no_grad():
            for layer in cl.layers.values():
                layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
        cl.end_task()
    return cl


def test_a_checkpoint_saved_in_one_dtype_loads_in_another(tmp_path):
    ids = torch.randint(2, 90, (3, 11))
    # weights of std 0.1, not the fixture's 0.3: those amplify bf16's rounding through the layers to ~5%
    # of the logits' scale (the base model's property, not the checkpoint's); here it is ~1%
    tiny = {"initializer_range": 0.1}
    fp32 = make_tiny_llama(**tiny)
    cl = _trained(fp32)
    cl.save(tmp_path / "fp32")
    with torch.no_grad(), cl.merged():
        want = fp32(input_ids=ids).logits

    bf16 = make_tiny_llama(**tiny).to(BF16)  # the same base weights, in bf16
    cl16 = mbf.ContinualLoRA.load(bf16, tmp_path / "fp32")
    assert cl16.task_index == 2
    for name, layer in cl16.layers.items():  # fp32 adapters: loaded bit for bit
        assert layer.merged_B.dtype == FP32 and torch.equal(layer.merged_B, cl.layers[name].merged_B)
    with torch.no_grad(), cl16.merged():
        got = bf16(input_ids=ids).logits
    assert got.dtype == BF16
    assert_close(got, want, BF16)
    assert (got.float() - want).abs().max() > 0  # the bf16 base moved them, within bf16's tolerance
    with torch.no_grad():  # while the adapter moves them far beyond it: the comparison can fail
        bare = make_tiny_llama(**tiny)(input_ids=ids).logits
    assert (bare - want).abs().max() > 10 * 2e-2 * want.abs().max()

    cl16.save(tmp_path / "bf16")  # and back into a float32 model: the very logits of the first
    back = mbf.ContinualLoRA.load(make_tiny_llama(**tiny), tmp_path / "bf16")
    with torch.no_grad(), back.merged():
        torch.testing.assert_close(back.model(input_ids=ids).logits, want, atol=0, rtol=0)


def test_qlora_base_computes_in_the_chosen_16_bit_dtype():
    """The same NF4 codes computed in bf16 and in fp32: the bf16 model is the fp32 one within bf16's
    tolerance, its adapters and their gradients fp32."""
    from mbf.nn import NF4Linear

    tiny = {"initializer_range": 0.1}  # see test_a_checkpoint_saved_in_one_dtype_loads_in_another
    lora = mbf.LoRAConfig(r=4, alpha=8, quantize="nf4")
    models_ = {dt: tiny_llama(**tiny).to(BF16).to(dt) for dt in (FP32, BF16)}  # bf16-exact weights
    for model in models_.values():
        models.quantize_base(model, lora)
        torch.manual_seed(3)  # the same A (inject draws it) and B in both models
        mbf.inject(model, lora)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B)  # the adapter takes part in the comparison
    nf4 = {dt: [m for m in model.modules() if isinstance(m, NF4Linear)] for dt, model in models_.items()}
    assert len(nf4[BF16]) == 2 * 7 and {m.compute_dtype for m in nf4[BF16]} == {BF16}
    for a, b in zip(nf4[FP32], nf4[BF16]):  # one 4-bit storage, two compute dtypes
        assert torch.equal(a.nf4.packed, b.nf4.packed)
    ids = torch.randint(2, 90, (2, 9))
    logits = {dt: model(input_ids=ids).logits for dt, model in models_.items()}
    assert logits[BF16].dtype == BF16
    assert_close(logits[BF16], logits[FP32], BF16)
    logits[BF16].float().logsumexp(-1).mean().backward()
    trainable = [p for p in models_[BF16].parameters() if p.requires_grad]
    assert trainable and all(p.dtype == FP32 and p.grad.dtype == FP32 for p in trainable)
    assert all(p.grad.abs().sum() > 0 for p in trainable)


def test_a_llamas_probe_is_one_decoder_layer_forward_and_backward(monkeypatch, probe):
    """The whole layer, not only its GEMMs, runs in the dtype; the adapters get fp32 gradients."""
    (layer,) = cpu_dtype._probes("bfloat16", cpu_dtype.SMOLLM2_SHAPES, 64)
    assert isinstance(layer, cpu_dtype.LayerProbe) and layer.shape == "layer"
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    state = torch.random.get_rng_state()
    layer()
    assert seen == [(BF16, (1, 9, 64, 64), (1, 9, 64, 64))]  # 9 heads of 64, the 3 KV heads repeated
    assert torch.equal(state, torch.random.get_rng_state())
    other = cpu_dtype._probes("float32", ((8, 16), (16, 8)), 64)
    assert [p.shape for p in other] == [(8, 16), (16, 8)]  # not a Llama: the linears' GEMMs

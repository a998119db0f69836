"""``backend="auto"`` end to end on the CPU under every wrapper users train with (the device-agnostic
harness): the real ``Dispatcher`` over CPU tensors with ``cpu=True``, real candidates (torch, and the
fused and hybrid Triton paths under the interpreter), a real wall-clock timer. The timer is *steered*
(its reading of one candidate is scaled down: the interpreter is ~100x slower than torch here) so
that the chosen path is a Triton one and the wrapper really runs it afterwards; every thunk still
runs and is timed.

Each test checks: the wrapped training finishes (a hang fails the test after ``HANG_S``), the
measurement ran in a clean context (no grad/inference-mode/autocast/saved-tensor hooks of the
caller's, outside any backward), the choice is cached on disk and a new process's dispatcher reads it
back without timing, and the result equals the torch path's.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_llama, token_examples
from torch import nn
from torch.utils.checkpoint import checkpoint

import mbf
from mbf.functional import dispatch
from mbf.functional.dispatch import Dispatcher

HANG_S = 240  # a wrapped step that has not finished by then is hung (the measurements take ~1-10 s)


class SteeredTimer:
    """Wall-clock ms of each timed thunk, scaled by 1e-6 for ``prefer`` (so it wins); records whether
    each timing ran in a clean context."""

    def __init__(self, prefer: str):
        self.prefer, self.contexts = prefer, []

    def __call__(self, thunk) -> float:
        self.contexts.append(
            dict(
                thread=threading.current_thread().name,
                inference=torch.is_inference_mode_enabled(),
                autocast=torch.is_autocast_enabled("cpu"),
                hooks=torch._C._autograd._top_saved_tensors_default_hooks(True) is not None,
                backward=torch._C._current_graph_task_id() != -1,
            )
        )
        ms = dispatch.cuda_event_timer(thunk)
        return ms * (1e-6 if thunk.candidate == self.prefer else 1.0)

    def assert_clean(self) -> None:
        assert self.contexts, "nothing was measured"
        clean = dict(
            thread="mbf-dispatch-measure", inference=False, autocast=False, hooks=False, backward=False
        )
        assert all(c == clean for c in self.contexts), self.contexts


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """``make(prefer)`` installs a harness dispatcher as the process's; removed after the test."""
    monkeypatch.delenv(dispatch.ENV, raising=False)

    def make(prefer: str = "triton") -> Dispatcher:
        timer = SteeredTimer(prefer)
        d = Dispatcher(timer, tmp_path / "dispatch", cpu=True, rounds=1, max_inner=1, verbose=False)
        dispatch.use_dispatcher(d)
        return d

    yield make
    dispatch.use_dispatcher(None)


def _chosen(d: Dispatcher) -> dict[str, str]:
    return {k: v["backend"] for k, v in d.choices.items()}


def _assert_cached(d: Dispatcher, want: str | None = None) -> None:
    """The choices are on disk and a new dispatcher reads them back without timing anything."""
    assert d.choices, "nothing was chosen"
    d.timer.assert_clean()
    if want is not None:
        assert set(_chosen(d).values()) == {want}, _chosen(d)

    def must_not_time(thunk):
        raise AssertionError("a cached choice was measured again")

    fresh = Dispatcher(must_not_time, d.folder, cpu=True, verbose=False)
    for key in d.choices:
        fresh._load(d.choices[key]["device"])
    assert _chosen(fresh) == _chosen(d)


def _finishes(fn, *args):
    """``fn(*args)`` in a thread (thread-local contexts must be entered inside ``fn``); fails, instead
    of hanging the suite, when it does not finish."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), f"{fn.__name__} hung (> {HANG_S} s): the dispatch deadlocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _layer(seed: int = 0, base: str = "dense", dropout: float = 0.0) -> mbf.LoRALinear:
    torch.manual_seed(seed)
    lin = nn.Linear(24, 40)
    if base == "nf4":
        from mbf.nn.nf4 import NF4Linear

        lin = NF4Linear.from_linear(nn.Linear(64, 40))
    layer = mbf.LoRALinear(lin, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _step(layer, x, wrap=None) -> list[torch.Tensor]:
    """Output and gradients of one forward + backward of ``wrap(layer, x)``."""
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = (wrap or (lambda f, v: f(v)))(layer, x)
    y.backward(torch.ones_like(y))
    return [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]


def _torch_path(layer, x, wrap=None) -> list[torch.Tensor]:
    layer.backend = "torch"
    try:
        return _step(layer, x, wrap)
    finally:
        layer.backend = "auto"


def _assert_same(got, want, atol=1e-4):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol)


def test_plain_training_measures_caches_and_runs_the_choice(harness):
    d = harness("hybrid")
    layer, x = _layer(), torch.randn(3, 5, 24)
    got = _finishes(_step, layer, x)
    _assert_cached(d, "hybrid")
    assert [k.split("|")[4] for k in d.choices] == ["train"]
    _assert_same(got, _torch_path(layer, x))


@pytest.mark.parametrize("offload", [False, True], ids=["non-reentrant", "non-reentrant+save_on_cpu"])
def test_non_reentrant_checkpointing_does_not_hang(harness, offload):
    """The regression: the measurement's backward fired the checkpoint's unpack hook, whose recompute
    called auto again and waited forever on the lock the measurement held."""
    d = harness("triton")

    def wrap(f, v):
        if offload:
            with torch.autograd.graph.save_on_cpu():
                return checkpoint(f, v, use_reentrant=False)
        return checkpoint(f, v, use_reentrant=False)

    layer, x = _layer(), torch.randn(7, 24)
    got = _finishes(_step, layer, x, wrap)
    _assert_cached(d, "triton")
    _assert_same(got, _torch_path(layer, x))


def test_reentrant_checkpointing_measures_the_training_case_on_the_next_step(harness):
    d = harness("triton")
    wrap = lambda f, v: checkpoint(f, v, use_reentrant=True)  # noqa: E731
    layer, x = _layer(), torch.randn(7, 24)
    first = _finishes(_step, layer, x, wrap)  # forward without grad: the inference case; recompute: wanted
    assert [k.split("|")[4] for k in d.choices] == ["infer"] and len(d._wanted) == 1
    second = _finishes(_step, layer, x, wrap)  # its forward measures the training case too
    assert sorted(k.split("|")[4] for k in d.choices) == ["infer", "train"] and not d._wanted
    _assert_cached(d, "triton")
    want = _torch_path(layer, x, wrap)
    _assert_same(first, want)
    _assert_same(second, want)


def test_autocast_and_inference_mode_are_not_seen_by_the_measurement(harness):
    d = harness("hybrid")
    layer, x = _layer(), torch.randn(6, 24)

    def autocast_step():  # contexts are thread-local: entered in _finishes' thread
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cpu")
            return _step(layer, x)

    def inference():
        with torch.inference_mode():
            return layer(x)

    _finishes(autocast_step)
    y = _finishes(inference)
    assert sorted(k.split("|")[4] for k in d.choices) == ["infer", "train"]
    _assert_cached(d, "hybrid")
    with torch.no_grad():
        layer.backend = "torch"
        torch.testing.assert_close(y, layer(x), atol=1e-4, rtol=1e-4)


def test_an_nf4_base_measures_its_paths(harness):
    d = harness("dequant")
    layer, x = _layer(base="nf4"), torch.randn(5, 64)
    got = _finishes(_step, layer, x)
    (key,) = d.choices
    assert key.endswith("|nf4") and set(d.choices[key]["ms"]) == {"torch", "fused", "dequant"}
    _assert_cached(d, "dequant")
    _assert_same(got, _torch_path(layer, x))


def test_torch_compile_uses_the_cached_choice_or_the_torch_path(harness, capsys):
    d = harness("triton")
    d.verbose = True
    layer, x = _layer(), torch.randn(6, 24)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # no graph break either
    unmeasured = _finishes(_step, compiled, x)  # first seen while tracing: nothing can run, torch path
    assert d.choices == {} and "not measured (first seen under torch.compile" in capsys.readouterr().err
    _finishes(_step, layer, x)  # one eager step measures
    assert set(_chosen(d).values()) == {"triton"}
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    traced = _finishes(_step, compiled, x)  # the cached choice, traced in
    _assert_cached(d, "triton")
    want = _torch_path(layer, x)
    _assert_same(unmeasured, want)
    _assert_same(traced, want)
    torch._dynamo.reset()


def test_the_trainer_with_gradient_checkpointing(harness, tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (mbf-lora[app])")
    d = harness("hybrid")
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    data = token_examples(0, n=8, T=10)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, save_strategy="no",
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, gradient_checkpointing=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    _finishes(trainer.train)
    assert model.is_gradient_checkpointing  # the decoder layers ran under activation checkpointing
    assert any("|train|" in k for k in d.choices)
    _assert_cached(d, "hybrid")


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_ranks_that_chose_differently_agree_on_rank_0s_choices(tmp_path, wrap):
    """DDP and FSDP2, 2 gloo processes: each rank measures for itself (their timers disagree here, as
    noisy GPUs can); ``dispatch.agree()`` hands rank 0's choices to every rank (asserted in the worker)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    from fixtures import dist_worker

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(getattr(dist_worker, f"dispatch_{wrap}"), args=(2, init, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").is_dir() and (tmp_path / "rank1").is_dir()  # each measured and cached


def test_generation_under_inference_mode(harness):
    pytest.importorskip("transformers", reason="needs transformers (mbf-lora[app])")
    d = harness("triton")
    model = make_tiny_llama()
    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)

    def generate():
        with torch.inference_mode():
            return model.generate(ids, **kw)

    out = _finishes(generate)
    assert {k.split("|")[4] for k in d.choices} == {"infer"}  # prefill and decode buckets, no gradient
    _assert_cached(d, "triton")
    for layer in model.modules():
        if isinstance(layer, mbf.LoRALinear):
            layer.backend = "torch"
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kw), out)  # the same tokens as the torch path

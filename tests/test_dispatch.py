"""The measuring dispatch of ``backend="auto"`` (mbf.functional.dispatch), proven on the CPU.

Timers are injected: a fake one reads a table of ms per backend, so the selection, the caches and
the precedence rules are tested without a GPU. One end-to-end test times the real candidates on
small CPU tensors (the fused one through Triton's interpreter) and checks the chosen path's output
against the float64 reference.
"""

import functools
import json
import warnings

import pytest
import torch
from conftest import assert_close

from mbf import reference
from mbf.functional import dispatch, lora_linear
from mbf.functional.dispatch import Case, Dispatcher, case_key


def _case(**kw) -> Case:
    base = dict(
        device="Fake GPU", dtype="bfloat16", adapter_dtype="float32", dropout=False, train=True,
        r=16, K=4096, N=4096, M=8192,
    )  # fmt: skip
    return Case(**{**base, **kw})


@pytest.fixture(autouse=True)
def _torch_and_fused_only(request, monkeypatch):
    """The selection tests below time two candidates (torch, fused); a test that takes the fixture
    ``all_candidates`` sees the registry as it ships (torch, fused, hybrid)."""
    if "all_candidates" not in request.fixturenames:
        two = {k: v for k, v in dispatch._CANDIDATES.items() if k in ("torch", "triton")}
        monkeypatch.setattr(dispatch, "_CANDIDATES", two)


@pytest.fixture
def all_candidates():
    return dispatch.candidates


def test_the_hybrid_path_is_measured_and_can_win(tmp_path, all_candidates):
    timer = FakeTimer({"torch": 1.0, "triton": 0.9, "hybrid": 0.8})
    assert Dispatcher(timer, tmp_path).choose(_case(), timer.bench) == "hybrid"
    assert timer.calls == ["torch", "triton", "hybrid"]
    from mbf.kernels.lora_op import MAX_RANK

    assert all_candidates(_case(r=MAX_RANK + 1)) == ["torch"]  # the low-rank kernels' limit too


class FakeTimer:
    """ms per backend from a table; counts the calls; a backend whose entry is an exception raises it."""

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def bench(self, name: str):
        return lambda: name

    def __call__(self, thunk) -> float:
        name = thunk()
        self.calls.append(name)
        value = self.table[name]
        if isinstance(value, Exception):
            raise value
        return value


def test_picks_the_fastest_and_keeps_torch_within_the_margin(tmp_path):
    timer = FakeTimer({"torch": 1.0, "triton": 0.7})
    assert Dispatcher(timer, tmp_path).choose(_case(), timer.bench) == "triton"
    assert sorted(timer.calls) == ["torch", "triton"]
    # 1 % faster is noise, not a win: the cuBLAS path stays (auto never measurably slower than it)
    close = FakeTimer({"torch": 1.0, "triton": 0.99})
    assert Dispatcher(close, tmp_path / "b").choose(_case(), close.bench) == "torch"
    slower = FakeTimer({"torch": 1.0, "triton": 1.5})
    assert Dispatcher(slower, tmp_path / "c").choose(_case(), slower.bench) == "torch"


def test_caches_in_memory_and_reloads_from_disk(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    d = Dispatcher(timer, tmp_path)
    assert d.choose(_case(), timer.bench) == "triton"
    assert d.choose(_case(), timer.bench) == "triton"
    assert len(timer.calls) == 2  # measured once
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("fake-gpu-")
    saved = json.loads(files[0].read_text())["choices"][case_key(_case())]
    assert saved["backend"] == "triton" and saved["ms"] == {"torch": 2.0, "triton": 1.0}
    # a new process (a new dispatcher) reads the choice back without timing anything
    fresh = FakeTimer({"torch": RuntimeError("must not be timed"), "triton": RuntimeError("idem")})
    assert Dispatcher(fresh, tmp_path).choose(_case(), fresh.bench) == "triton"
    assert fresh.calls == []


def test_memory_only_dispatcher_writes_nothing(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    assert Dispatcher(timer, tmp_path, persist=False).choose(_case(), timer.bench) == "triton"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [dict(r=8), dict(dtype="float16"), dict(adapter_dtype="bfloat16"), dict(dropout=True),
     dict(train=False), dict(K=14336), dict(N=1024), dict(M=2048), dict(device="Other GPU")],
)  # fmt: skip
def test_every_key_field_separates_cases(tmp_path, change):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    d = Dispatcher(timer, tmp_path)
    d.choose(_case(), timer.bench)
    timer.table = {"torch": 1.0, "triton": 2.0}
    assert d.choose(_case(**change), timer.bench) == "torch"  # measured again: its own entry
    assert len(timer.calls) == 4
    assert d.choose(_case(), timer.bench) == "triton"  # the first entry is untouched


def test_tokens_share_a_power_of_two_bucket():
    assert [dispatch._bucket(m) for m in (1, 2, 3, 5000, 8192, 8193)] == [1, 2, 4, 8192, 8192, 16384]


def test_a_candidate_that_raises_is_skipped_with_a_note(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": RuntimeError("out of resources: shared memory")})
    d = Dispatcher(timer, tmp_path)
    with pytest.warns(UserWarning, match="candidate 'triton' skipped.*out of resources"):
        assert d.choose(_case(), timer.bench) == "torch"
    entry = d.choices[case_key(_case())]
    assert entry["ms"] == {"torch": 2.0} and "out of resources" in entry["notes"]["triton"]


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    path = Dispatcher(timer, tmp_path).path("Fake GPU")
    path.write_text('{"tag": "Fake GPU|1.0", "choi')  # a half-written file from some crash
    with pytest.warns(UserWarning, match="dispatch cache ignored"):
        assert Dispatcher(timer, tmp_path).choose(_case(), timer.bench) == "triton"
    assert json.loads(path.read_text())["choices"][case_key(_case())]["backend"] == "triton"  # rewritten
    # a file of other versions (an upgraded torch, triton or mbf) is measured again, not trusted
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "tag": "Fake GPU|0.0|0.0|0.0"}))
    timer.calls.clear()
    with pytest.warns(UserWarning, match="not a dispatch cache of this GPU and these versions"):
        Dispatcher(timer, tmp_path).choose(_case(), timer.bench)
    assert len(timer.calls) == 2
    # an entry naming a backend this install lacks is measured again, not handed to lora_linear
    data = json.loads(path.read_text())
    data["choices"][case_key(_case())]["backend"] = "cublaslt"
    path.write_text(json.dumps(data))
    timer.calls.clear()
    assert Dispatcher(timer, tmp_path).choose(_case(), timer.bench) == "triton" and len(timer.calls) == 2


def test_a_second_process_entries_are_merged_not_lost(tmp_path):
    t1, t2 = FakeTimer({"torch": 2.0, "triton": 1.0}), FakeTimer({"torch": 1.0, "triton": 2.0})
    d1, d2 = Dispatcher(t1, tmp_path), Dispatcher(t2, tmp_path)
    d1.choose(_case(), t1.bench)  # d1 has read the (empty) file
    d2.choose(_case(r=4), t2.bench)  # another process adds its entry
    d1.choose(_case(r=8), t1.bench)  # d1 writes again: it merges the file, not overwrites it
    choices = json.loads(d1.path("Fake GPU").read_text())["choices"]
    backends = [choices[case_key(_case(r=r))]["backend"] for r in (16, 4, 8)]
    assert backends == ["triton", "torch", "triton"]


def test_ranks_above_the_fused_limit_measure_torch_alone(all_candidates):
    from mbf.kernels.lora_op import MAX_RANK

    assert dispatch.candidates(_case(r=MAX_RANK)) == ["torch", "triton", "hybrid"]
    assert dispatch.candidates(_case(r=MAX_RANK + 1)) == ["torch"]


def _small(dtype=torch.float32, r=4, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 24, generator=g, dtype=dtype).requires_grad_(requires_grad)
    W = torch.randn(40, 24, generator=g, dtype=dtype) / 5
    A = (torch.randn(r, 24, generator=g) / 5).requires_grad_(requires_grad)
    B = (torch.randn(40, r, generator=g) / 2).requires_grad_(requires_grad)
    return x, W, None, A, B, 2.0, None, 1.0, 0.0


def test_environment_override_and_its_error(monkeypatch, tmp_path):
    timer = FakeTimer({})  # any measurement would raise a KeyError
    d = Dispatcher(timer, tmp_path)
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.auto_backend(*_small(), run=lora_linear, dispatcher=d) == "torch"
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.auto_backend(*_small(), run=lora_linear, dispatcher=d) == "triton"
    assert timer.calls == []
    monkeypatch.setenv(dispatch.ENV, "cublas")
    with pytest.raises(ValueError, match=r"\$MBF_BACKEND='cublas' must be one of"):
        dispatch.auto_backend(*_small(), run=lora_linear, dispatcher=d)


def test_deterministic_mode_pins_the_documented_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    timer = FakeTimer({})
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        chosen = dispatch.auto_backend(*_small(), run=lora_linear, dispatcher=Dispatcher(timer, tmp_path))
    finally:
        torch.use_deterministic_algorithms(before)
    assert chosen == dispatch.DETERMINISTIC_CHOICE == "torch" and timer.calls == []


def test_register_candidate_rejects_an_unknown_backend(all_candidates):
    with pytest.raises(ValueError, match="dispatch candidate 'cublas' must be a lora_linear backend"):
        dispatch.register_candidate("cublas")


@pytest.mark.parametrize("requires_grad", [True, False])
def test_end_to_end_times_the_real_candidates_and_the_choice_is_exact(
    tmp_path, monkeypatch, requires_grad, all_candidates
):
    """Real thunks on CPU tensors (the fused kernels under the interpreter), a wall-clock timer: each
    candidate runs its forward (and backward) on fresh inputs; the caller's RNG is not touched."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    seen = []

    def timer(thunk):
        thunk()
        seen.append(1)
        return float(len(seen))  # the first measured (torch) is "fastest"

    args = _small(requires_grad=requires_grad)
    state = torch.random.get_rng_state()
    d = Dispatcher(timer, tmp_path)
    chosen = dispatch.auto_backend(*args, run=lora_linear, dispatcher=d)
    assert chosen == "torch" and len(seen) == 3  # torch, the fused kernels, the hybrid path
    assert torch.equal(state, torch.random.get_rng_state())
    (entry,) = d.choices.values()
    assert entry["notes"] == {} and ("|train|" in case_key(_case(train=requires_grad))) == requires_grad
    x, W, b, A, B, s = args[:6]
    for name in ("torch", "triton", "hybrid"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = lora_linear(x, W, b, A, B, s, backend=name)
        expected = reference.lora_linear(*(t.double() for t in (x, W)), None, A.double(), B.double(), s)
        assert_close(y, expected, torch.float32)


# The GPU script's correctness stage runs `-k headline` without MBF_PIN_CONFIGS: the autotuned fused path
# and the dispatch's choice at the headline shapes (M 8192, r 16, bf16); on CPU the same test at small odd
# shapes (the fused kernels under the interpreter).
_HEADLINE = [(8192, 4096, 4096), (8192, 4096, 14336)] if torch.cuda.is_available() else [(19, 24, 40)]


@pytest.mark.parametrize(
    "adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"]
)
@pytest.mark.parametrize("M,K,N", _HEADLINE, ids=lambda v: str(v))
def test_headline_autotuned_and_dispatched_paths_match_the_reference(monkeypatch, M, K, N, adapter_dtype):
    monkeypatch.delenv("MBF_PIN_CONFIGS", raising=False)  # the autotuned configs, as users run them
    monkeypatch.delenv(dispatch.ENV, raising=False)
    dev, r = ("cuda" if torch.cuda.is_available() else "cpu"), 16
    g = torch.Generator(dev).manual_seed(M + N)
    x = torch.randn(M, K, generator=g, device=dev).bfloat16().requires_grad_()
    W = (torch.randn(N, K, generator=g, device=dev) / K**0.5).bfloat16()
    A = (torch.randn(r, K, generator=g, device=dev) / K**0.5).to(adapter_dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g, device=dev) / r**0.5).to(adapter_dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g, device=dev).bfloat16()
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref = reference.lora_linear(leaves[0], W.double(), None, leaves[1], leaves[2], 2.0)
    ref.backward(dy.double())
    timer = functools.partial(dispatch.cuda_event_timer, reps=5 if dev == "cuda" else 1)
    chosen = dispatch.auto_backend(x, W, None, A, B, 2.0, None, 1.0, 0.0, run=lora_linear,
                                   dispatcher=Dispatcher(timer, persist=False))  # fmt: skip
    # on CUDA "auto" goes through lora_linear's own hook (the process's dispatcher); on CPU the choice
    results = {}
    for name in dict.fromkeys(["triton", "torch", "auto" if dev == "cuda" else chosen]):
        for t in (x, A, B):
            t.grad = None
        y = lora_linear(x, W, None, A, B, 2.0, backend=name)
        y.backward(dy)
        results[name] = [y, x.grad, A.grad, B.grad]
        for got, want in zip(results[name], [ref, *(t.grad for t in leaves)]):
            assert_close(got, want, got.dtype)
    for got, want in zip(results["triton"], results["torch"]):  # the fused path against the torch path
        assert_close(got.double(), want.double(), got.dtype)

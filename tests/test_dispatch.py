"""The measuring dispatch of ``backend="auto"`` (mbf.functional.dispatch), proven on the CPU.

Timers are injected: a fake one reads a table of ms per backend, so the selection, the caches and
the precedence rules are tested without a GPU. One end-to-end test times the real candidates on
small CPU tensors (the fused one through Triton's interpreter) and checks the chosen path's output
against the float64 reference.
"""

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
    assert _d(timer, tmp_path).choose(_case(), timer.bench) == "hybrid"
    assert timer.calls == ["torch", "triton", "hybrid"] * 2  # a single call each, then one round
    from mbf.kernels.lora_op import MAX_RANK

    assert all_candidates(_case(r=MAX_RANK + 1)) == ["torch"]  # the low-rank kernels' limit too


class FakeTimer:
    """ms per call per backend from a table, times the calls a timed batch made; records the backend of
    each timed batch; a backend whose entry is an exception raises it."""

    def __init__(self, table: dict):
        self.table, self.calls, self.runs = table, [], []

    def bench(self, name: str):
        def once():
            value = self.table[name]
            if isinstance(value, Exception):
                raise value
            self.runs.append(name)
            return name

        return once

    def __call__(self, thunk) -> float:
        before = len(self.runs)
        name = thunk()
        self.calls.append(name)
        return self.table[name] * (len(self.runs) - before)


def _d(timer, folder=None, **kw) -> Dispatcher:
    """A quiet dispatcher of one timed round: each candidate is timed twice (a single call, a batch)."""
    return Dispatcher(timer, folder, **{"rounds": 1, "verbose": False, **kw})


def test_picks_the_fastest_and_keeps_torch_within_the_margin(tmp_path):
    timer = FakeTimer({"torch": 1.0, "triton": 0.7})
    assert _d(timer, tmp_path).choose(_case(), timer.bench) == "triton"
    assert sorted(timer.calls) == ["torch", "torch", "triton", "triton"]
    # 1 % faster is noise, not a win: the cuBLAS path stays (auto never measurably slower than it)
    close = FakeTimer({"torch": 1.0, "triton": 0.99})
    assert _d(close, tmp_path / "b").choose(_case(), close.bench) == "torch"
    slower = FakeTimer({"torch": 1.0, "triton": 1.5})
    assert _d(slower, tmp_path / "c").choose(_case(), slower.bench) == "torch"


def test_caches_in_memory_and_reloads_from_disk(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    d = _d(timer, tmp_path)
    assert d.choose(_case(), timer.bench) == "triton"
    assert d.choose(_case(), timer.bench) == "triton"
    assert len(timer.calls) == 4  # measured once (two timings per candidate)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("fake-gpu-")
    saved = json.loads(files[0].read_text())["choices"][case_key(_case())]
    assert saved["backend"] == "triton" and saved["ms"] == {"torch": 2.0, "triton": 1.0}
    # a new process (a new dispatcher) reads the choice back without timing anything
    fresh = FakeTimer({"torch": RuntimeError("must not be timed"), "triton": RuntimeError("idem")})
    assert _d(fresh, tmp_path).choose(_case(), fresh.bench) == "triton"
    assert fresh.calls == []


def test_memory_only_dispatcher_writes_nothing(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    assert _d(timer, tmp_path, persist=False).choose(_case(), timer.bench) == "triton"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [dict(r=8), dict(dtype="float16"), dict(adapter_dtype="bfloat16"), dict(dropout=True),
     dict(train=False), dict(K=14336), dict(N=1024), dict(M=2048), dict(device="Other GPU")],
)  # fmt: skip
def test_every_key_field_separates_cases(tmp_path, change):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    d = _d(timer, tmp_path)
    d.choose(_case(), timer.bench)
    timer.table = {"torch": 1.0, "triton": 2.0}
    assert d.choose(_case(**change), timer.bench) == "torch"  # measured again: its own entry
    assert len(timer.calls) == 8
    assert d.choose(_case(), timer.bench) == "triton"  # the first entry is untouched


def test_tokens_share_a_power_of_two_bucket():
    assert [dispatch._bucket(m) for m in (1, 2, 3, 5000, 8192, 8193)] == [1, 2, 4, 8192, 8192, 16384]


def test_a_candidate_that_raises_is_skipped_with_a_note(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": RuntimeError("out of resources: shared memory")})
    d = _d(timer, tmp_path)
    with pytest.warns(UserWarning, match="candidate 'triton' skipped.*out of resources"):
        assert d.choose(_case(), timer.bench) == "torch"
    entry = d.choices[case_key(_case())]
    assert entry["ms"] == {"torch": 2.0} and "out of resources" in entry["notes"]["triton"]


def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    path = _d(timer, tmp_path).path("Fake GPU")
    path.write_text('{"tag": "Fake GPU|1.0", "choi')  # a half-written file from some crash
    with pytest.warns(UserWarning, match="dispatch cache ignored"):
        assert _d(timer, tmp_path).choose(_case(), timer.bench) == "triton"
    assert json.loads(path.read_text())["choices"][case_key(_case())]["backend"] == "triton"  # rewritten
    # a file of other versions (an upgraded torch, triton or mbf) is measured again, not trusted
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "tag": "Fake GPU|0.0|0.0|0.0"}))
    timer.calls.clear()
    with pytest.warns(UserWarning, match="not a dispatch cache of this device, these versions and kernels"):
        _d(timer, tmp_path).choose(_case(), timer.bench)
    assert len(timer.calls) == 4
    # an entry naming a backend this install lacks is measured again, not handed to lora_linear
    data = json.loads(path.read_text())
    data["choices"][case_key(_case())]["backend"] = "cublaslt"
    data["choices"]["Fake GPU|no device field"] = {"backend": "torch"}  # kept: the file names the device
    path.write_text(json.dumps(data))
    timer.calls.clear()
    with pytest.warns(UserWarning, match="entry 'Fake GPU.*' ignored"):
        assert _d(timer, tmp_path).choose(_case(), timer.bench) == "triton" and len(timer.calls) == 4
    # nested to the recursion limit: ignored with the file's name, not a RecursionError at every shape
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.warns(UserWarning, match="dispatch cache ignored"):
        assert _d(timer, tmp_path).choose(_case(r=2), timer.bench) == "triton"


def test_a_second_process_entries_are_merged_not_lost(tmp_path):
    t1, t2 = FakeTimer({"torch": 2.0, "triton": 1.0}), FakeTimer({"torch": 1.0, "triton": 2.0})
    d1, d2 = _d(t1, tmp_path), _d(t2, tmp_path)
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
    d = _d(timer, tmp_path)
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
        chosen = dispatch.auto_backend(*_small(), run=lora_linear, dispatcher=_d(timer, tmp_path))
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
    d = _d(timer, tmp_path)
    chosen = dispatch.auto_backend(*args, run=lora_linear, dispatcher=d)
    assert chosen == "torch" and len(seen) == 6  # torch, the fused kernels, the hybrid path, twice
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
    d = _d(dispatch.cuda_event_timer, persist=False, max_inner=1 if dev == "cpu" else 50)
    chosen = dispatch.auto_backend(x, W, None, A, B, 2.0, None, 1.0, 0.0, run=lora_linear, dispatcher=d)
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


# -- the timing rule: margin, spread, interleaving, batches ------------------------------------------


@pytest.mark.parametrize("faster_by,chosen", [(0.0201, "triton"), (0.0199, "torch")])
def test_the_margin_is_two_percent_on_a_quiet_timer(tmp_path, faster_by, chosen):
    timer = FakeTimer({"torch": 1.0, "triton": 1.0 / (1.0 + faster_by)})
    d = _d(timer, tmp_path, rounds=5)
    assert d.choose(_case(), timer.bench) == chosen
    entry = d.choices[case_key(_case())]
    assert entry["margin"] == dispatch.MARGIN == 0.02 and entry["spread"] == {"torch": 0.0, "triton": 0.0}


class NoisyTimer(FakeTimer):
    """The table's ms per call times a factor cycling through ``noise`` per timed batch of a backend."""

    def __init__(self, table: dict, noise: dict):
        super().__init__(table)
        self.noise, self.seen = noise, {}

    def __call__(self, thunk) -> float:
        ms = super().__call__(thunk)
        name = self.calls[-1]
        i = self.seen[name] = self.seen.get(name, -1) + 1
        factors = self.noise.get(name, [1.0])
        return ms * factors[i % len(factors)]


def test_the_margin_grows_with_the_measured_spread(tmp_path):
    # torch's batches vary ±10 %: a candidate 5 % faster is inside the noise and does not replace it
    noise = {"torch": [1.0, 0.9, 1.1, 0.9, 1.1, 0.9, 1.1, 1.0]}  # the first is the sizing call
    timer = NoisyTimer({"torch": 1.0, "triton": 0.95}, noise)
    d = _d(timer, tmp_path, rounds=7)
    assert d.choose(_case(), timer.bench) == "torch"
    entry = d.choices[case_key(_case())]
    assert entry["spread"]["torch"] == pytest.approx(0.1, abs=1e-3) and entry["spread"]["triton"] == 0
    assert entry["margin"] == pytest.approx(0.1, abs=1e-3) and entry["rounds"] == 7
    # the same 5 % on a quiet timer is a win
    quiet = FakeTimer({"torch": 1.0, "triton": 0.95})
    assert _d(quiet, tmp_path / "q", rounds=7).choose(_case(), quiet.bench) == "triton"


def test_candidates_are_interleaved_and_timed_in_back_to_back_batches(tmp_path, all_candidates):
    timer = FakeTimer({"torch": 0.5, "triton": 0.25, "hybrid": 1.0})
    d = _d(timer, tmp_path, rounds=3, batch_ms=2.0)
    assert d.choose(_case(), timer.bench) == "triton"
    sizing, rounds = timer.calls[:3], timer.calls[3:]
    assert sizing == ["torch", "triton", "hybrid"]
    # each round starts with another candidate: no candidate always runs first (or after the same one)
    assert rounds == ["torch", "triton", "hybrid", "triton", "hybrid", "torch", "hybrid", "torch", "triton"]
    # batches of ceil(2 ms / fastest single call) = 8 calls, one timer call (one sync) around each
    entry = d.choices[case_key(_case())]
    assert entry["inner"] == 8 and timer.runs.count("torch") == 1 + 1 + 3 * 8  # warm-up, sizing, rounds
    assert entry["ms"] == {"torch": 0.5, "triton": 0.25, "hybrid": 1.0}


def test_the_cache_file_changes_with_the_kernel_sources(tmp_path, monkeypatch):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    d = _d(timer, tmp_path)
    d.choose(_case(), timer.bench)
    before = d.path("Fake GPU")
    assert dispatch.kernels_hash() in json.loads(before.read_text())["tag"]
    dispatch.kernels_hash.cache_clear()
    monkeypatch.setattr(dispatch.Path, "read_bytes", lambda self: b"an edited kernel")
    try:
        edited = dispatch.kernels_hash()
    finally:
        dispatch.kernels_hash.cache_clear()
    monkeypatch.setattr(dispatch, "kernels_hash", lambda: edited)
    assert d.path("Fake GPU") != before  # a kernel fix is measured again, not served an old choice
    timer.calls.clear()
    assert _d(timer, tmp_path).choose(_case(), timer.bench) == "triton" and len(timer.calls) == 4


def test_a_measurement_prints_one_line(tmp_path, capsys):
    timer = FakeTimer({"torch": 2.0, "triton": 1.0})
    _d(timer, tmp_path, verbose=True).choose(_case(), timer.bench)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbf: chose triton for 4096→4096 r16 bfloat16 M≤8192 train in")


# -- contexts where nothing is measured: a defined answer each ----------------------------------------


def _harness_args():
    x, W, b, A, B, s, mB, lam, p = _small()
    return (x, W, b, A, B, s, mB, lam, p)


def steered(ms: dict):
    """A timer that runs the real thunk and reports ``ms[candidate]`` per call (the thunk's label)."""

    def timer(thunk) -> float:
        thunk()
        return ms[thunk.candidate]

    return timer


def test_inside_a_backward_the_fallback_runs_and_the_next_forward_measures(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    d = _d(steered({"torch": 2.0, "triton": 1.0, "hybrid": 3.0}), tmp_path)
    monkeypatch.setattr(dispatch, "_in_backward", lambda: True)
    assert dispatch.auto_backend(*_harness_args(), run=lora_linear, dispatcher=d) == dispatch.FALLBACK
    assert d.choices == {} and len(d._wanted) == 1 and next(iter(d._wanted)).train
    monkeypatch.setattr(dispatch, "_in_backward", lambda: False)
    with torch.no_grad():  # reentrant checkpointing's forward: trainable adapters, no grad
        assert dispatch.auto_backend(*_harness_args(), run=lora_linear, dispatcher=d) == "triton"
    modes = sorted(key.split("|")[4] for key in d.choices)
    assert modes == ["infer", "train"] and d._wanted == set()


def test_graph_capture_uses_only_a_choice_measured_in_this_process(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    first = _d(steered({"torch": 2.0, "triton": 1.0, "hybrid": 3.0}), tmp_path)
    assert dispatch.auto_backend(*_harness_args(), run=lora_linear, dispatcher=first) == "triton"
    monkeypatch.setattr(dispatch, "_capturing", lambda: True)
    assert dispatch.auto_backend(*_harness_args(), run=lora_linear, dispatcher=first) == "triton"
    # a new process that only read the choice from disk would autotune during the capture: fallback
    fresh = _d(FakeTimer({}), tmp_path)
    assert dispatch.auto_backend(*_harness_args(), run=lora_linear, dispatcher=fresh) == dispatch.FALLBACK


def test_regression_auto_inside_non_reentrant_checkpointing_finishes(tmp_path, monkeypatch):
    """Hung forever before: the measurement's backward fired the checkpoint's unpack hook, whose
    recompute called auto_backend again and waited on the lock the measurement held."""
    import threading

    from torch.utils.checkpoint import checkpoint

    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, W, b, A, B, s, mB, lam, p = _small()
    d = _d(dispatch.cuda_event_timer, tmp_path, max_inner=1)

    def layer(v):
        chosen = dispatch.auto_backend(v, W, b, A, B, s, mB, lam, p, run=lora_linear, dispatcher=d)
        return lora_linear(v, W, b, A, B, s, backend=chosen)

    done = []
    worker = threading.Thread(
        target=lambda: done.append(checkpoint(layer, x, use_reentrant=False).sum().backward()), daemon=True
    )
    worker.start()
    worker.join(120)
    assert done, "auto_backend under non-reentrant checkpointing hung"
    assert A.grad is not None and len(d.choices) == 1

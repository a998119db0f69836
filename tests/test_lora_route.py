"""The route of the LoRA op (``mbf.kernels.route``): its docstring's table is what runs, and the op has
one signature at every level.

Each row of the table is expanded over its ``any`` cells and run through ``mbf.functional.lora_linear``
(forward and backward, the Triton paths under the interpreter on CPU) while the kernels and bases it
can reach are watched: the path, the low-rank passes and dA that really ran must be the row's.
"""

import inspect
import itertools

import pytest
import torch

from mbf import functional, nf4, reference
from mbf.functional import bases, dispatch
from mbf.functional import lora as lora_mod
from mbf.functional.dispatch import Dispatcher
from mbf.kernels import route

lora_op = pytest.importorskip("mbf.kernels.lora_op")
lora_lowrank = pytest.importorskip("mbf.kernels.lora_lowrank")
knf4 = pytest.importorskip("mbf.kernels.nf4")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADER = ("backend", "base", "rank", "M", "trains", "path", "low-rank", "dA")


def _table() -> list[dict[str, str]]:
    """The rows of the route's table, as written in its docstring."""
    lines = route.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == list(HEADER))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(dict(zip(HEADER, line.split(), strict=True)))
    return rows


TABLE = _table()


def _values(column: str, cell: str, base: str) -> list:
    """The concrete values a cell stands for (``any``: each kind)."""
    if column == "backend":
        return ["torch", "triton", "hybrid"] if cell == "any" else [cell]
    if column == "base":
        return ["dense", "nf4"] if cell == "any" else [cell]
    if column == "rank":
        return {"any": [4, route.MAX_RANK + 1], "<=max": [4], ">max": [route.MAX_RANK + 1]}[cell]
    if column == "M":
        tokens = {"any": [5, 17], "<=16": [route.FUSED_MAX_M], ">16": [route.FUSED_MAX_M + 1]}[cell]
        return tokens if base == "nf4" else tokens[:1]  # M decides nothing over a dense W0
    return {"yes": [True], "no": [False]}[cell]


def _cases(row: dict[str, str]):
    """Every (backend, base, r, M, trains) the row stands for."""
    for backend in _values("backend", row["backend"], ""):
        for base in _values("base", row["base"], ""):
            cells = (_values(c, row[c], base) for c in ("rank", "M", "trains"))
            for r, M, trains in itertools.product(*cells):
                yield backend, base, r, M, trains


def test_the_table_is_the_route_and_its_constants():
    assert len(TABLE) == 13
    assert "<=16" in {row["M"] for row in TABLE} and route.FUSED_MAX_M == 16  # the table's 16 is the constant
    assert functional.MAX_FUSED_RANK is route.MAX_RANK  # the public name is an alias of the one constant
    seen = set()
    for row in TABLE:
        for backend, base, r, M, trains in _cases(row):
            got = route.route(backend=backend, base=base, rank=r, M=M, cuda=False, trainable_base=trains)
            want = (row["path"], row["low-rank"], row["dA"])
            if (backend, base, r, M, trains) not in seen:  # the first row that matches decides
                assert (got.path, got.lowrank, got.da) == want, (row, backend, base, r, M, trains)
                assert got.backend == backend and got.max_rank == route.MAX_RANK
            seen.add((backend, base, r, M, trains))
    assert {row["path"] for row in TABLE} == set(route.PATHS)


class Watch:
    """Records which kernels and bases a call reached (each wrapped, then called through)."""

    def __init__(self, monkeypatch):
        self.seen = set()
        for module, name, event in (
            (lora_op, "_forward", "fused"),
            (lora_op, "_backward", "fused-da"),
            (lora_lowrank, "down", "lowrank"),
            (lora_lowrank, "da", "lowrank-da"),
            (knf4, "nf4_dequantize", "nf4-dequant"),
            (knf4, "nf4_addmm", "nf4-fused"),
            (bases, "dequantize_nf4", "nf4-torch"),
            (lora_mod, "_autograd_lora", "autograd"),
        ):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), event))
        torch_da = lora_mod.lowrank._Torch.da
        monkeypatch.setattr(lora_mod.lowrank._Torch, "da", staticmethod(self._wrap(torch_da, "torch-da")))

    def _wrap(self, fn, event):
        def watched(*args, **kwargs):
            self.seen.add(event)
            return fn(*args, **kwargs)

        return watched

    def route(self) -> tuple[str, str, str]:
        """(path, low-rank, dA) of what ran."""
        paths = [p for p in ("autograd", "fused", "nf4-fused", "nf4-dequant", "nf4-torch") if p in self.seen]
        assert len(paths) <= 1, self.seen
        low = "fused" if "fused" in self.seen else "triton" if "lowrank" in self.seen else "torch"
        path = paths[0] if paths else "hybrid" if low == "triton" else "torch"
        if path == "autograd":
            return path, "torch", "autograd"
        da = {"fused-da": "fused", "lowrank-da": "apart", "torch-da": "torch"}
        (ran,) = [v for k, v in da.items() if k in self.seen]
        return path, low, ran


def _inputs(base: str, r: int, M: int, trains: bool):
    g = torch.Generator().manual_seed(r + M)
    K, N = 64, 24  # NF4 wants K a multiple of 64
    x = torch.randn(M, K, generator=g).to(DEVICE).requires_grad_()
    W = (torch.randn(N, K, generator=g) / 8).to(DEVICE)
    A = (torch.randn(r, K, generator=g) / 8).to(DEVICE).requires_grad_()
    B = torch.randn(N, r, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(N, generator=g).to(DEVICE).requires_grad_(trains)
    return x, nf4.quantize_nf4(W) if base == "nf4" else W, bias, A, B


@pytest.mark.parametrize("row", TABLE, ids=[" ".join(row.values()) for row in TABLE])
def test_each_row_runs_its_path(monkeypatch, row):
    for backend, base, r, M, trains in _cases(row):
        watch = Watch(monkeypatch)
        x, W, bias, A, B = _inputs(base, r, M, trains)
        y = functional.lora_linear(x, W, bias, A, B, 0.5, dropout=0.25, seed=3, backend=backend)
        y.square().sum().backward()
        assert watch.route() == (row["path"], row["low-rank"], row["dA"]), (backend, base, r, M, trains)


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """``make(prefer)``: the process's dispatcher measures CPU tensors and ``prefer`` wins."""
    monkeypatch.delenv(dispatch.ENV, raising=False)

    def make(prefer: str) -> Dispatcher:
        timer = lambda thunk: dispatch.cuda_event_timer(thunk) * (1e-6 if thunk.candidate == prefer else 1.0)  # noqa: E731
        d = Dispatcher(timer, tmp_path, cpu=True, rounds=1, max_inner=1, verbose=False)
        dispatch.use_dispatcher(d)
        return d

    yield make
    dispatch.use_dispatcher(None)


@pytest.mark.skipif(DEVICE == "cuda", reason="the harness dispatcher measures CPU tensors")
@pytest.mark.parametrize(
    "base,prefer,nf4_path,want",
    [
        ("dense", "hybrid", "auto", ("hybrid", "triton", "apart")),  # measured: the choice is the backend
        ("dense", "triton", "auto", ("fused", "fused", "fused")),
        ("nf4", "dequant", "auto", ("nf4-dequant", "torch", "torch")),  # over NF4: triton + that path
        ("nf4", "torch", "auto", ("nf4-torch", "torch", "torch")),
        ("nf4", "dequant", "fused", ("nf4-torch", "torch", "torch")),  # a named path is not measured
    ],
)
def test_auto_runs_the_measured_choice(monkeypatch, harness, base, prefer, nf4_path, want):
    d = harness(prefer)
    x, W, bias, A, B = _inputs(base, 4, 5, False)
    assert dispatch.dispatches(x)
    watch = Watch(monkeypatch)
    functional.lora_linear(x, W, bias, A, B, 0.5, backend="auto", nf4_path=nf4_path)  # measures (or not)
    measured = route.measures("auto", base, nf4_path, True)
    assert [e["backend"] for e in d.choices.values()] == ([prefer] if measured else [])
    watch.seen.clear()  # a measurement runs every candidate: what runs now is the call's own path
    functional.lora_linear(x, W, bias, A, B, 0.5, nf4_path=nf4_path).square().sum().backward()
    assert watch.route() == want


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors")
def test_unmeasured_auto_on_the_cpu_is_torch(monkeypatch):
    dispatch.use_dispatcher(None)
    x, W, bias, A, B = _inputs("dense", 4, 5, False)
    assert not dispatch.dispatches(x) and route.unmeasured(cuda=False) == "torch"
    watch = Watch(monkeypatch)
    functional.lora_linear(x, W, bias, A, B, 0.5).square().sum().backward()
    assert watch.route() == ("torch", "torch", "torch")


SHARED = ("x", "weight", "bias", "A", "B", "scaling", "merged_B", "lam", "dropout", "seed")


@pytest.mark.parametrize("level", ["kernel", "reference"])
def test_the_op_has_one_signature_at_every_level(level):
    """``mbf.kernels.lora_op.lora_linear`` and ``mbf.reference.lora_linear`` take ``mbf.functional``'s
    parameters in its order, kinds, defaults and types (``weight`` aside: only the functional level takes
    an NF4 weight); what each level adds after them is keyword-only."""
    fn = {"kernel": lora_op.lora_linear, "reference": reference.lora_linear}[level]
    want = inspect.signature(functional.lora_linear, eval_str=True).parameters
    got = inspect.signature(fn, eval_str=True).parameters
    assert tuple(want)[: len(SHARED)] == tuple(got)[: len(SHARED)] == SHARED
    for name in SHARED:
        assert (got[name].kind, got[name].default) == (want[name].kind, want[name].default), name
        if name != "weight":
            assert got[name].annotation == want[name].annotation, name
    assert want["dropout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert want["seed"].annotation == int | torch.Tensor | None
    extra = list(got.values())[len(SHARED) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), extra

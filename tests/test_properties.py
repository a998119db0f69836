"""Property-based tests (hypothesis): the invariants hold for any input, not just the ones we thought of."""

import copy
import shutil

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from conftest import assert_close_elementwise
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import mbf
from mbf import nf4, reference
from mbf.closed_form import lam_schedule
from mbf.io import atomic_save_safetensors, load_safetensors

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def _matrix(rows, cols):
    return hnp.arrays(np.float32, st.tuples(rows, cols), elements=finite).map(torch.from_numpy)


def _abs_run(x, W, b, A, B, s, p, seed, dy):
    """Output and gradients of x, A, B of the float64 reference (``signs``: the values as given; on
    absolute values: each entry's magnitude, the sum of its terms' sizes)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y = reference.lora_linear(leaves[0], W.double(), None if b is None else b.double(), leaves[1],
                              leaves[2], s, dropout=p, seed=seed)  # fmt: skip
    y.backward(dy.double())
    return [y.detach(), *(t.grad for t in leaves)]


@settings(max_examples=24, deadline=None)
@given(
    M=st.integers(1, 9),
    K=st.integers(1, 40),
    N=st.integers(1, 40),
    r=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    backend=st.sampled_from(["torch", "triton", "hybrid"]),
    dropout=st.sampled_from([0.0, 0.3]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_lora_linear_matches_the_reference_entry_by_entry(M, K, N, r, dtype, backend, dropout, bias, seed):
    """Any shape, dtype (fp32, bf16, fp16 base and fp32 adapters) and path (torch, fused and hybrid
    Triton under the interpreter): the output and every gradient within each entry's own bound."""
    assume(r <= min(K, N))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K**0.5).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(dtype)
    y = mbf.functional.lora_linear(x, W, b, A, B, 2.0, dropout=dropout, seed=seed, backend=backend)
    y.backward(dy)
    got = [y, x.grad, A.grad, B.grad]
    want = _abs_run(x, W, b, A, B, 2.0, dropout, seed, dy)
    size = _abs_run(x.abs(), W.abs(), None if b is None else b.abs(), A.abs(), B.abs(), 2.0, dropout, seed,
                    dy.abs())  # fmt: skip
    for name, gt, wt, mg, dt in zip(("y", "x.grad", "A.grad", "B.grad"), got, want, size,
                                    (dtype, dtype, torch.float32, torch.float32)):  # fmt: skip
        # the adapters' gradients are fp32 but computed from 16-bit dY and x: their bound is the base's
        assert gt is not None, name
        try:
            assert_close_elementwise(gt, wt, mg, dtype if dtype != torch.float32 else dt)
        except AssertionError as err:
            raise AssertionError(f"{backend} {dtype} {name}: {err}") from None


@FAST
@given(
    W=_matrix(st.integers(1, 12), st.integers(1, 12)),
    r=st.integers(1, 12),
    alpha=st.floats(0.01, 64),
    seed=st.integers(0, 2**31 - 1),
)
def test_fold_unfold_round_trip(W, r, alpha, seed):
    out_f, in_f = W.shape
    assume(r <= min(out_f, in_f))
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = mbf.LoRALinear.from_linear(lin, r=r, alpha=alpha, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, in_f)
    with torch.no_grad():
        before = layer(x)
        layer.fold()
        folded = layer(x)
        layer.unfold()
        after = layer(x)
    scale = 1.0 + before.abs().max().item()
    torch.testing.assert_close(folded, before, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(lin.weight, W, atol=1e-5 * (1 + W.abs().max().item()), rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5 * scale, rtol=1e-5)


@st.composite
def rank_deficient(draw):
    """A finite ``(r, d)`` matrix, often with repeated, scaled or zero rows (rank-deficient)."""
    d = draw(st.integers(1, 24))
    r = draw(st.integers(1, d))
    A = draw(_matrix(st.just(r), st.just(d)))
    for i in range(r):
        kind = draw(st.sampled_from(["keep", "keep", "zero", "copy"]))
        if kind == "zero":
            A[i] = 0.0
        elif kind == "copy" and i > 0:
            A[i] = A[draw(st.integers(0, i - 1))] * draw(st.floats(-4, 4))
    return A


@FAST
@given(A=rank_deficient())
def test_orthonormal_rows_for_any_finite_A(A):
    """Q has r orthonormal rows whose span contains A's rows, whatever A's rank."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rank-deficiency warning is tested elsewhere
        (Q,) = mbf.functional.orthonormal_rows([A], backend="torch")
    r = A.shape[0]
    Q64, A64 = Q.double(), A.double()
    torch.testing.assert_close(Q64 @ Q64.T, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    residual = A64 - (A64 @ Q64.T) @ Q64  # A's rows projected off Q's span
    assert residual.abs().max().item() <= 1e-5 * (1.0 + A64.abs().max().item())


@FAST
@given(
    W=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([64, 128])), elements=finite),
    double_quant=st.booleans(),
)
def test_nf4_round_trip_error_is_bounded(W, double_quant):
    """Per 64-block: |W − deq(q(W))| ≤ half the widest NF4 gap × the block's absmax, plus what the
    double quantisation moved the block's scale by (the codes lie in [−1, 1])."""
    W = torch.from_numpy(W)
    w = nf4.quantize_nf4(W, double_quant=double_quant)
    err = (nf4.dequantize_nf4(w, torch.float32) - W).abs().view(-1, 64)
    absmax = W.abs().view(-1, 64).amax(dim=1)
    scale_err = (w.block_scales() - absmax).abs()
    half_gap = max(b - a for a, b in zip(nf4.NF4_CODE, nf4.NF4_CODE[1:])) / 2
    bound = half_gap * absmax + scale_err + 1e-6 * (1 + absmax)
    assert bool((err.amax(dim=1) <= bound).all())


@FAST
@given(
    tensors=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
        hnp.arrays(
            st.sampled_from([np.float32, np.float64, np.int64, np.uint8]),
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
        ),
        max_size=5,
    )
)
def test_load_of_save_is_identity(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    atomic_save_safetensors(data, path)
    back = load_safetensors(path)
    assert back.keys() == data.keys()
    for k in data:
        assert back[k].dtype == data[k].dtype and back[k].shape == data[k].shape
        assert back[k].numpy().tobytes() == data[k].numpy().tobytes()  # bit for bit, NaN payloads too


class _Tiny(nn.Module):
    """Two named linears: the smallest model ContinualLoRA can drive."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(6, 5), nn.Linear(6, 4)


class SLAOMachine(RuleBasedStateMachine):
    """Any sequence of begin / train / end / save / load / crashed save keeps SLAO's state exact.

    A shadow model holds what the method says the merged adapter must be (DESIGN.md's equations in
    float64); every step compares the live state against it.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = _Tiny()
        mbf.inject(self.model, mbf.LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
        self.cl = mbf.ContinualLoRA(self.model, backend="torch")
        self.tmp = None
        self.saved = None  # (state_dict, shadow) of the last committed save
        self.shadow_B = {
            n: torch.zeros_like(lay.merged_B, dtype=torch.float64) for n, lay in self.cl.layers.items()
        }
        self.shadow_A = {
            n: torch.zeros_like(lay.merged_A, dtype=torch.float64) for n, lay in self.cl.layers.items()
        }
        self.tasks = 0

    def teardown(self):
        if self.tmp is not None:  # each example's checkpoint folder: none is left behind
            shutil.rmtree(self.tmp, ignore_errors=True)

    @precondition(lambda self: not self.cl.in_task)
    @rule()
    def begin(self):
        self.cl.begin_task()

    @precondition(lambda self: self.cl.in_task)
    @rule(seed=st.integers(0, 1000))
    def train(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.cl.layers.values():
                layer.lora_A.add_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g))

    @precondition(lambda self: self.cl.in_task)
    @rule()
    def end(self):
        lam = lam_schedule("sqrt", self.tasks + 1)
        for n, layer in self.cl.layers.items():
            self.shadow_B[n] = self.shadow_B[n] + lam * (layer.lora_B.detach().double() - self.shadow_B[n])
            self.shadow_A[n] = layer.lora_A.detach().double().clone()
        self.cl.end_task()
        self.tasks += 1

    @rule()
    def save(self):
        import tempfile
        from pathlib import Path

        self.tmp = self.tmp or Path(tempfile.mkdtemp(prefix="slao-machine-"))
        self.cl.save(self.tmp)
        self.saved = (
            copy.deepcopy(self.cl.state_dict()),
            dict(self.shadow_A),
            dict(self.shadow_B),
            self.tasks,
        )

    @precondition(lambda self: self.saved is not None)
    @rule()
    def crashed_save(self):
        """The process dies after the tensors, before the commit point: the last save still loads."""
        import mbf.checkpoint as checkpoint

        real = checkpoint.atomic_write_json

        def die(*args, **kwargs):
            raise KeyboardInterrupt

        checkpoint.atomic_write_json = die
        try:
            with pytest.raises(KeyboardInterrupt):
                self.cl.save(self.tmp)
        finally:
            checkpoint.atomic_write_json = real
        self.load()

    @precondition(lambda self: self.saved is not None)
    @rule()
    def load(self):
        fresh = _Tiny()
        self.cl = mbf.ContinualLoRA.load(fresh, self.tmp, backend="torch")
        self.model = fresh
        state, self.shadow_A, self.shadow_B, self.tasks = self.saved
        self.shadow_A, self.shadow_B = dict(self.shadow_A), dict(self.shadow_B)
        for key, t in state["tensors"].items():
            name, _, attr = key.rpartition(".")
            assert torch.equal(getattr(self.cl.layers[name], attr), t)
        assert (self.cl.task_index, self.cl.in_task) == (state["task_index"], state["in_task"])

    @invariant()
    def merged_adapter_follows_the_equations(self):
        assert self.cl.task_index == self.tasks
        for n, layer in self.cl.layers.items():
            torch.testing.assert_close(layer.merged_B.double(), self.shadow_B[n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.merged_A.double(), self.shadow_A[n], atol=0, rtol=0)
            if self.cl.in_task and self.tasks >= 1:
                Q = layer.lora_A.detach().double()
                assert torch.isfinite(Q).all()


TestSLAOStateMachine = SLAOMachine.TestCase
TestSLAOStateMachine.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)

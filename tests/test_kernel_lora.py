"""The fused LoRA Triton kernel (``mbf.kernels.lora``) against the float64 spec.

On CPU the kernels run through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so the
shapes are small and odd: M = 1, sizes that are not multiples of the interpreter's 16-wide blocks,
ranks 1, 5, 16 and 64. The ``gpu`` tests run the same comparisons at Llama sizes on CUDA.
Every case checks the output and all three gradients (x, A, B) against autograd through
``mbf.reference.lora_linear`` in float64, with the one tolerance table of conftest. The bf16 cases
also guard the interpreter's bf16 ``tl.dot`` hole (it multiplies bit patterns: ~1e10 garbage).
"""

import math

import pytest
import torch
from conftest import assert_close

from mbf import functional, reference

triton = pytest.importorskip("triton")
lora_kernel = pytest.importorskip("mbf.kernels.lora")
lora_op = pytest.importorskip("mbf.kernels.lora_op")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# the kernels run compiled on a GPU when there is one, under the interpreter on CPU otherwise
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, K, N, r, dtype, *, bias=True, merged=False, device=KERNEL_DEVICE, x_transposed=False):
    """Random inputs scaled so y and every gradient are O(1): the table's atol then means something."""
    M = math.prod(batch)
    if x_transposed:  # a non-contiguous (M, K) view: the kernels must honour x's strides
        x = torch.randn(K, M, device=device).to(dtype).T.reshape(*batch, K)
    else:
        x = torch.randn(*batch, K, device=device).to(dtype)
    t = {
        "x": x,
        "weight": (torch.randn(N, K, device=device) / K**0.5).to(dtype),
        "bias": torch.randn(N, device=device).to(dtype) if bias else None,
        "A": (torch.randn(r, K, device=device) / K**0.5).to(dtype),
        "B": (torch.randn(N, r, device=device) / r**0.5).to(dtype),  # random, never the zero init
        "merged_B": (torch.randn(N, r, device=device) / r**0.5).to(dtype) if merged else None,
    }
    dY = (torch.randn(*batch, N, device=device) / M**0.5).to(dtype)
    return t, dY


def _run(t, dY, backend, requires=("x", "A", "B"), **kw):
    """Output and gradients of functional.lora_linear (float64 reference when backend is None)."""
    if backend is None:
        t = {k: v.double() if v is not None else None for k, v in t.items()}
        dY = dY.double()
    t = {k: v.detach().requires_grad_(k in requires) if v is not None else None for k, v in t.items()}
    if backend is None:
        y = reference.lora_linear(**t, **kw)
    else:
        y = functional.lora_linear(**t, **kw, backend=backend)
    y.backward(dY)
    return y, {k: t[k].grad for k in requires}


def _check(t, dY, dtype, requires=("x", "A", "B"), **kw):
    y, grads = _run(t, dY, "triton", requires, **kw)
    y_ref, grads_ref = _run(t, dY, None, requires, **kw)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    for name in requires:
        assert grads[name].dtype == dtype and grads[name].shape == grads_ref[name].shape, name
        assert_close(grads[name], grads_ref[name], dtype)


# (batch dims, K, N, r, bias, merged, λ, dropout p, x transposed)
CASES = {
    "M7-r1-bias": ((7,), 24, 17, 1, True, False, 1.0, 0.0, False),
    "M33-r16-merged": ((3, 11), 40, 48, 16, False, True, 0.37, 0.0, False),
    "M1-r16-merged-dropout": ((1,), 40, 17, 16, True, True, 0.5, 0.25, False),
    "M30-r5-all-strided": ((2, 3, 5), 24, 48, 5, True, True, 0.71, 0.5, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_reference(case, dtype):
    batch, K, N, r, bias, merged, lam, p, transposed = case
    t, dY = _inputs(batch, K, N, r, dtype, bias=bias, merged=merged, x_transposed=transposed)
    _check(t, dY, dtype, scaling=0.75, lam=lam, dropout=p, seed=1234 if p else None)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_rank_64(dtype):
    t, dY = _inputs((9,), 40, 17, 64, dtype, merged=True)
    _check(t, dY, dtype, scaling=2.0, lam=0.5, dropout=0.1, seed=99)


def test_lam_zero_is_the_merged_adapter_and_gives_B_no_gradient():
    t, dY = _inputs((5,), 24, 17, 3, torch.float32, merged=True)
    _check(t, dY, torch.float32, scaling=1.25, lam=0.0)
    y, grads = _run(t, dY, "triton", scaling=1.25, lam=0.0)
    assert torch.equal(grads["B"], torch.zeros_like(grads["B"]))  # dB = s·λ·dYᵀS with λ = 0
    y_m, _ = _run({**t, "B": t["merged_B"], "merged_B": None}, dY, "triton", scaling=1.25)
    assert_close(y, y_m.double(), torch.float32)


@pytest.mark.parametrize(
    "requires", [("A", "B"), ("x", "B"), ("B",), ("x",)], ids=["frozen-x", "frozen-A", "B-only", "x-only"]
)
def test_partial_gradients(requires):
    # x without a gradient (the first adapted layer) takes the dA-only path of the dX kernel
    t, dY = _inputs((2, 9), 40, 17, 4, torch.float32, merged=True)
    _check(t, dY, torch.float32, requires=requires, scaling=0.5, lam=0.6, dropout=0.3, seed=5)


def test_dropout_mask_is_the_reference_mask_and_follows_the_seed():
    t, dY = _inputs((19,), 40, 17, 8, torch.float32)
    kw = {"scaling": 1.0, "dropout": 0.4}
    y1, g1 = _run(t, dY, "triton", seed=2**40 + 7, **kw)  # a 64-bit seed: both Philox key words
    y_ref, g_ref = _run(t, dY, None, seed=2**40 + 7, **kw)
    # one flipped mask bit moves y by ~0.1, a thousand times the fp32 tolerance: the masks are equal
    assert_close(y1, y_ref, torch.float32)
    assert_close(g1["A"], g_ref["A"], torch.float32)
    assert_close(g1["x"], g_ref["x"], torch.float32)
    y1b, _ = _run(t, dY, "triton", seed=2**40 + 7, **kw)
    assert torch.equal(y1, y1b)
    y2, g2 = _run(t, dY, "triton", seed=2**40 + 8, **kw)
    assert (y2 - y1).abs().max() > 1e-2
    assert (g2["A"] - g1["A"]).abs().max() > 1e-2
    # the base path never sees the mask
    y0, _ = _run(t, dY, "triton", scaling=0.0, dropout=0.4, seed=3)
    assert_close(
        y0,
        torch.nn.functional.linear(t["x"].double(), t["weight"].double(), t["bias"].double()),
        torch.float32,
    )


def test_autotuning_leaves_the_results_exact(monkeypatch):
    # On a GPU the first call per key benchmarks every candidate config, re-running kernels that
    # accumulate atomically: the buffers they add into must be re-zeroed, and nothing else may be.
    # The interpreter normally skips tuning; here two candidates and a stand-in timer force it.
    timings = iter(range(100, 0, -1))

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        t = float(next(timings))
        return [t, t, t]

    for tuner in (lora_kernel.down, lora_kernel.linear, lora_kernel.dy):
        small = tuner.early_config_prune(tuner.configs, {}, m_bucket=16)[0]
        bigger = triton.Config({k: 2 * v if k.startswith("BLOCK") else v for k, v in small.kwargs.items()})
        candidates = [small, bigger]
        monkeypatch.setattr(tuner, "early_config_prune", lambda configs, nargs, _c=candidates, **kw: _c)
        monkeypatch.setattr(tuner, "_do_bench", fake_bench)
        monkeypatch.setattr(tuner, "cache", {})
    t, dY = _inputs((2, 9), 40, 17, 5, torch.float32, merged=True)
    _check(t, dY, torch.float32, scaling=0.5, lam=0.6, dropout=0.3, seed=5)


def test_threshold_is_the_reference_threshold():
    for p in (0.0, 1e-9, 0.1, 0.25, 0.5, 0.999, 1 - 2**-40):
        assert lora_op._threshold(p) == reference.dropout_threshold(p)


def test_empty_batch():
    t, dY = _inputs((0,), 24, 17, 3, torch.float32)
    y, grads = _run(t, dY, "triton", scaling=1.0)
    assert y.shape == (0, 17)
    assert torch.equal(grads["A"], torch.zeros_like(grads["A"]))


def test_dropout_without_seed_is_refused():
    t, _ = _inputs((3,), 24, 17, 2, torch.float32)
    with pytest.raises(ValueError, match="needs a seed"):
        lora_op.lora_linear(**t, scaling=1.0, dropout=0.1)
    with pytest.raises(ValueError, match=r"dropout 1.0 must be in \[0, 1\)"):
        lora_op.lora_linear(**t, scaling=1.0, dropout=1.0, seed=1)


def test_trainable_base_is_refused():
    t, _ = _inputs((3,), 24, 17, 2, torch.float32, merged=True)
    for frozen in ("weight", "bias", "merged_B"):
        args = {**t, frozen: t[frozen].detach().requires_grad_()}
        with pytest.raises(ValueError, match="frozen"):
            lora_op.lora_linear(**args, scaling=1.0)


def test_custom_op_registration():
    # schema, fake (meta) kernel and autograd registration of the torch.library ops
    t, _ = _inputs((6,), 24, 17, 3, torch.float32, merged=True)
    args = (
        t["x"],
        t["weight"],
        t["bias"],
        t["A"].requires_grad_(),
        t["B"].requires_grad_(),
        t["merged_B"],
        0.5,
        0.3,
        0.2,
        11,
    )
    torch.library.opcheck(
        torch.ops.mbf.lora_linear_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_traces_through_the_op():
    t, dY = _inputs((2, 5), 24, 17, 3, torch.float32, merged=True)

    def f(x, weight, bias, A, B, merged_B):
        return lora_op.lora_linear(x, weight, bias, A, B, 0.5, merged_B, 0.3, 0.2, 11).square().sum()

    leaves = {k: v.detach().requires_grad_(k in ("x", "A", "B")) for k, v in t.items()}
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(**leaves)
    loss.backward()
    ref = {k: v.detach().double().requires_grad_(k in ("x", "A", "B")) for k, v in t.items()}
    loss_ref = (
        reference.lora_linear(
            ref["x"], ref["weight"], ref["bias"], ref["A"], ref["B"], 0.5, ref["merged_B"], 0.3, 0.2, 11
        )
        .square()
        .sum()
    )
    loss_ref.backward()
    assert_close(loss, loss_ref, torch.float32)
    for k in ("x", "A", "B"):
        assert_close(leaves[k].grad, ref[k].grad, torch.float32)


# ------------------------------------------------------------------------------------------------
# Real sizes on CUDA
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        ((2, 1024), 4096, 4096, 16),
        ((4096,), 4096, 1024, 64),
        ((1,), 4096, 14336, 8),
        ((777,), 1000, 3000, 128),
    ],
    ids=["4096-4096-r16", "4096-1024-r64", "M1-4096-14336-r8", "odd-r128"],
)
@pytest.mark.parametrize("merged,p", [(False, 0.0), (True, 0.1)], ids=["plain", "merged-dropout"])
def test_gpu_real_sizes(shape, dtype, merged, p):
    batch, K, N, r = shape
    t, dY = _inputs(batch, K, N, r, dtype, merged=merged, device="cuda")
    _check(t, dY, dtype, scaling=2.0, lam=0.5, dropout=p, seed=2024 if p else None)


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_inductor():
    t, dY = _inputs((512,), 1024, 768, 16, torch.bfloat16, merged=True, device="cuda")
    leaves = {k: v.detach().requires_grad_(k in ("x", "A", "B")) for k, v in t.items()}

    def f(x, weight, bias, A, B, merged_B):
        return lora_op.lora_linear(x, weight, bias, A, B, 2.0, merged_B, 0.5, 0.1, 7)

    y = torch.compile(f, fullgraph=True)(**leaves)  # inductor: the op stays one opaque node
    y.backward(dY)
    y_ref, g_ref = _run(t, dY, None, scaling=2.0, lam=0.5, dropout=0.1, seed=7)
    assert_close(y, y_ref, torch.bfloat16)
    for k in ("x", "A", "B"):
        assert_close(leaves[k].grad, g_ref[k], torch.bfloat16)

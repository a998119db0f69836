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
from mbf.functional.dropout import philox_keep_mask
from mbf.kernels import route
from mbf.kernels.policy import decide_policy

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
lora_kernel = pytest.importorskip("mbf.kernels.lora")
lora_tiles = pytest.importorskip("mbf.kernels.lora_tiles")
lora_op = pytest.importorskip("mbf.kernels.lora_op")
common = pytest.importorskip("mbf.kernels._common")

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


def _policy(x, p=0.0, seed=None):
    """The policy functional.lora_linear would decide for x (fp32 adapters' promotion aside)."""
    return decide_policy(x, (), p, seed)


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


def _check(t, dY, dtype, requires=("x", "A", "B"), backend="triton", **kw):
    y, grads = _run(t, dY, backend, requires, **kw)
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
        assert _policy(torch.zeros(1), p, 3).threshold == reference.dropout_threshold(p)


@pytest.mark.parametrize("M,K", [(1, 3), (5, 37), (33, 130)])
@pytest.mark.parametrize("seed", [0, 2**40 + 7, 2**63 - 1])
def test_one_mask_on_the_torch_path_and_in_the_kernels(M, K, seed):
    """One seed, one mask: the torch paths' vectorised Philox, the Triton mask kernel (the torch paths
    on a GPU) and the kernels' in-tile ``keep_factor`` (``test_kernel_mask_is_the_reference_mask_bit_
    for_bit``) all give ``reference.dropout_keep_mask``."""
    want = reference.dropout_keep_mask((M, K), 0.3, seed)
    key = torch.tensor(seed, device=KERNEL_DEVICE)
    assert torch.equal(lora_op.keep_mask(M, K, reference.dropout_threshold(0.3), key).cpu(), want)
    assert torch.equal(philox_keep_mask(M, K, reference.dropout_threshold(0.3), key).cpu(), want)


def test_same_seed_same_numbers_on_the_torch_and_triton_paths():
    """The policy end to end: the fused op (interpreter) and the torch Function, one seed, one mask."""
    t, dY = _inputs((2, 9), 40, 17, 4, torch.float32, merged=True)
    kw = dict(scaling=0.5, lam=0.6, dropout=0.5, seed=2**40 + 1)
    y, g = _run(t, dY, "triton", **kw)
    y_t, g_t = _run(t, dY, "torch", **kw)
    assert_close(y, y_t.double(), torch.float32)
    for name in g:
        assert_close(g[name], g_t[name].double(), torch.float32)


def test_empty_batch():
    t, dY = _inputs((0,), 24, 17, 3, torch.float32)
    y, grads = _run(t, dY, "triton", scaling=1.0)
    assert y.shape == (0, 17)
    assert torch.equal(grads["A"], torch.zeros_like(grads["A"]))


def test_trainable_base_is_refused():
    t, _ = _inputs((3,), 24, 17, 2, torch.float32, merged=True)
    for frozen in ("weight", "bias", "merged_B"):
        args = {**t, frozen: t[frozen].detach().requires_grad_()}
        with pytest.raises(ValueError, match="frozen"):
            lora_op.lora_linear(**args, scaling=1.0, lam=1.0, policy=_policy(t["x"]))


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
        reference.dropout_threshold(0.2),
        torch.tensor(11, device=KERNEL_DEVICE),
    )
    torch.library.opcheck(
        torch.ops.mbf.lora_linear_fwd.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_traces_through_the_op():
    t, dY = _inputs((2, 5), 24, 17, 3, torch.float32, merged=True)

    def f(x, weight, bias, A, B, merged_B):
        y = lora_op.lora_linear(x, weight, bias, A, B, 0.5, merged_B, 0.3, dropout=0.2, seed=11)
        return y.square().sum()

    leaves = {k: v.detach().requires_grad_(k in ("x", "A", "B")) for k, v in t.items()}
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(**leaves)
    loss.backward()
    ref = {k: v.detach().double().requires_grad_(k in ("x", "A", "B")) for k, v in t.items()}
    args = [ref[k] for k in ("x", "weight", "bias", "A", "B")]
    loss_ref = reference.lora_linear(*args, 0.5, ref["merged_B"], 0.3, dropout=0.2, seed=11).square().sum()
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
        return lora_op.lora_linear(x, weight, bias, A, B, 2.0, merged_B, 0.5, dropout=0.1, seed=7)

    y = torch.compile(f, fullgraph=True)(**leaves)  # inductor: the op stays one opaque node
    y.backward(dY)
    y_ref, g_ref = _run(t, dY, None, scaling=2.0, lam=0.5, dropout=0.1, seed=7)
    assert_close(y, y_ref, torch.bfloat16)
    for k in ("x", "A", "B"):
        assert_close(leaves[k].grad, g_ref[k], torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Dropout mask, mixed precision, determinism, pinned configs, index guards
# ------------------------------------------------------------------------------------------------


@triton.jit
def _keep_probe(
    out_ptr, M, K, seed: tl.int64, threshold: tl.int64, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    # the kernels' own mask helper, tile by tile, written out as 0/1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    keep = lora_tiles.keep_factor(seed, threshold, offs_m, k0, K, BLOCK_K, tl.float32, True)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep, mask=mask)


@pytest.mark.parametrize("M,K,block_k", [(5, 37, 16), (33, 64, 32), (1, 3, 16), (20, 130, 64)])
@pytest.mark.parametrize("seed,p", [(0, 0.5), (2**40 + 7, 0.1), (123456789, 0.9)])
def test_kernel_mask_is_the_reference_mask_bit_for_bit(M, K, block_k, seed, p):
    # one Philox-4x32 call per four columns; K not a multiple of 4 and any tile width give one mask
    out = torch.full((M, K), -1.0, device=KERNEL_DEVICE)
    grid = (triton.cdiv(M, 16), triton.cdiv(K, block_k))
    _keep_probe[grid](out, M, K, seed, reference.dropout_threshold(p), BLOCK_M=16, BLOCK_K=block_k)
    want = reference.dropout_keep_mask((M, K), p, seed)
    assert torch.equal(out.cpu(), want.float())
    assert abs(want.float().mean().item() - (1 - p)) < 0.25  # not all kept, not all dropped


@pytest.mark.parametrize("base", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("p", (0.0, 0.3))
def test_fp32_adapters_over_a_16_bit_base_keep_fp32(base, p):
    # The LoRA branch reads fp32 A / B / B_m tiles and returns fp32 dA, dB with no 16-bit rounding:
    # they match the float64 reference to the fp32 tolerance (a bf16 rounding would be ~300x off).
    t, dY = _inputs((3, 7), 40, 24, 5, base, merged=True)
    t = {k: (v.float() if k in ("A", "B", "merged_B") else v) for k, v in t.items()}
    kw = dict(scaling=0.75, lam=0.6, dropout=p, seed=11 if p else None)
    y, g = _run(t, dY, "triton", **kw)
    y_t, g_t = _run(t, dY, "torch", **kw)
    y_ref, g_ref = _run(t, dY, None, **kw)
    assert y.dtype == base and g["x"].dtype == base
    assert g["A"].dtype == torch.float32 and g["B"].dtype == torch.float32
    assert_close(y, y_ref, base)
    assert_close(g["x"], g_ref["x"], base)
    for name in ("A", "B"):
        assert_close(g[name], g_ref[name], torch.float32)
        assert_close(g_t[name], g_ref[name], torch.float32)  # the torch path keeps fp32 the same way


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_deterministic_mode_is_bit_identical_and_matches_reference(dtype, monkeypatch):
    # Under torch.use_deterministic_algorithms(True), dA and dB come from one program per column
    # tile that sums all of M in a fixed order (no atomics) and every launch runs one pinned config.
    # The interpreter runs programs one after another, so it cannot show the atomics' run-to-run
    # differences on a GPU; this checks that the deterministic path is taken, writes every element
    # (deterministic mode fills new tensors with NaN) and equals the reference, twice, bit for bit.
    calls = []
    monkeypatch.setattr(lora_op, "_wgrad", lambda *a, _f=lora_op._wgrad: calls.append(1) or _f(*a))
    t, dY = _inputs((2, 19), 40, 33, 6, dtype, merged=True)
    kw = dict(scaling=0.5, lam=0.3, dropout=0.2, seed=9)
    torch.use_deterministic_algorithms(True)
    try:
        y1, g1 = _run(t, dY, "triton", **kw)
        y2, g2 = _run(t, dY, "triton", **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(calls) == 4  # dA and dB, twice
    y_ref, g_ref = _run(t, dY, None, **kw)
    assert torch.equal(y1, y2)
    for name in ("x", "A", "B"):
        assert torch.equal(g1[name], g2[name]), name
        assert_close(g1[name], g_ref[name], dtype)


def test_wide_ranks_sum_dA_and_dB_in_their_own_pass(monkeypatch):
    # R_PAD above FUSE_MAX_R_PAD: dA and dB leave the dY / dX passes for the fixed-order kernel
    calls = []
    monkeypatch.setattr(lora_op, "_wgrad", lambda *a, _f=lora_op._wgrad: calls.append(1) or _f(*a))
    t, dY = _inputs((2, 9), 40, 17, 37, torch.bfloat16, merged=True)
    _check(t, dY, torch.bfloat16, scaling=0.5, lam=0.6, dropout=0.3, seed=5)
    assert len(calls) == 2 and lora_op.pad_rank(37) > route.FUSE_MAX_R_PAD


@pytest.mark.parametrize("r", [5, 37], ids=["r5-atomics", "r37-ordered-dB"])
@pytest.mark.parametrize("requires", [("x", "A", "B"), ("A", "B"), ("x",)], ids=["all", "frozen-x", "x-only"])
def test_hybrid_path_matches_reference(r, requires):
    """backend="hybrid": base GEMMs by torch (cuBLAS on a GPU), S / dS + dB / dA by the Triton kernels;
    above FUSE_MAX_R_PAD dB comes from the fixed-order pass instead of atomics."""
    t, dY = _inputs((2, 9), 40, 17, r, torch.bfloat16, merged=True, x_transposed=True)
    t = {k: (v.float() if k in ("A", "B", "merged_B") else v) for k, v in t.items()}  # fp32 adapters
    y, g = _run(t, dY, "hybrid", requires, scaling=0.5, lam=0.6, dropout=0.3, seed=5)
    y_ref, g_ref = _run(t, dY, None, requires, scaling=0.5, lam=0.6, dropout=0.3, seed=5)
    assert_close(y, y_ref, torch.bfloat16)
    for name in requires:
        assert_close(g[name], g_ref[name], torch.bfloat16 if name == "x" else torch.float32)


def test_hybrid_path_is_deterministic_under_deterministic_mode():
    t, dY = _inputs((2, 19), 40, 33, 6, torch.float32, merged=True)
    kw = dict(scaling=0.5, lam=0.3, dropout=0.2, seed=9)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(t, dY, "hybrid", **kw) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    y_ref, g_ref = _run(t, dY, None, **kw)
    assert torch.equal(runs[0][0], runs[1][0])
    for name in ("x", "A", "B"):
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name
        assert_close(runs[0][1][name], g_ref[name], torch.float32)


def test_ranks_above_the_fused_limit_take_the_torch_path():
    t, dY = _inputs((5,), 24, 17, functional.MAX_FUSED_RANK + 1, torch.float32)
    _check(t, dY, torch.float32, scaling=0.5)  # backend="triton" over a dense W0: the torch Function


def test_pinned_configs_skip_the_autotuner(monkeypatch):
    # MBF_PIN_CONFIGS=1: one config per kernel, no candidate timed (GPU correctness runs)
    monkeypatch.setenv("MBF_PIN_CONFIGS", "1")
    for tuner in (lora_kernel.down, lora_kernel.linear, lora_kernel.dy):
        monkeypatch.setattr(tuner, "run", lambda *a, **k: pytest.fail("the autotuner ran"))
    t, dY = _inputs((9,), 40, 17, 4, torch.float32, merged=True)
    _check(t, dY, torch.float32, scaling=0.5, lam=0.6, dropout=0.3, seed=5)


@pytest.mark.parametrize(
    "x_dtype,adapter_dtype",
    [(torch.bfloat16,) * 2, (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    + [(torch.float32,) * 2],
)
def test_pruning_keeps_two_candidates_for_every_variant_and_token_count(x_dtype, adapter_dtype, monkeypatch):
    # the GPU pruning (the interpreter's is one fixed config); M <= 16 used to keep a single config
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, ad = torch.empty(0, dtype=x_dtype), torch.empty(0, dtype=adapter_dtype)
    launches = {
        lora_kernel.down: [dict(x_ptr=x, a_ptr=ad, HAS_DROPOUT=p) for p in (False, True)],
        lora_kernel.dy: [dict(dy_ptr=x, b_ptr=ad, ACC_DB=db) for db in (False, True)],
        lora_kernel.linear: [
            dict(lhs_ptr=x, up_ptr=ad, ACC_DA=da, HAS_DROPOUT=p)
            for da in (False, True)
            for p in (False, True)
        ],
    }
    for tuner, variants in launches.items():
        for args in variants:
            for r_pad in (16, 32, 64):
                for m_bucket in (2**i for i in range(17)):
                    args.update(R_PAD=r_pad, m_bucket=m_bucket, PRECISION="tf32x3")  # the tightest
                    kept = tuner.early_config_prune(tuner.configs, {}, **args)
                    assert len(kept) >= 2, (tuner.fn.__name__, args, r_pad, m_bucket)
                    assert all(c.kwargs["BLOCK_M"] <= max(16, m_bucket) for c in kept)


def test_int32_pointer_steps_are_guarded():
    # in-kernel pointers advance by BLOCK x stride in int32: a stride of 2**23 + 1 would overflow
    tall = torch.randint(0, 9, (2, 2**23 + 1), dtype=torch.uint8).T  # (2**23 + 1, 2), column stride 2**23 + 1
    fixed = lora_op._int32_steps("x", tall)
    assert fixed.is_contiguous() and torch.equal(fixed, tall)  # a transposed view gets copied
    view = torch.randn(5, 3).T
    assert lora_op._int32_steps("x", view) is view  # small strides: no copy
    with pytest.raises(ValueError, match="x: rows of 8388609 elements exceed the kernels' int32 pointer"):
        lora_op._int32_steps("x", torch.empty(1, 2**23 + 1, dtype=torch.uint8))


def test_unsupported_rank_and_dtype_are_refused():
    t, _ = _inputs((3,), 24, 17, 2, torch.float32)
    A65, B65 = torch.randn(65, 24, device=KERNEL_DEVICE), torch.randn(17, 65, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"rank 65 must be in \[1, 64\]"):
        lora_op.lora_linear(t["x"], t["weight"], None, A65, B65, 1.0)
    x64 = t["x"].double()
    with pytest.raises(ValueError, match="the fused LoRA kernel takes"):
        lora_op.lora_linear(x64, t["weight"].double(), None, t["A"], t["B"], 1.0)


@triton.jit
def _split_probe(x_ptr, sum_ptr, hi_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    p1, p2, p3 = common.bf16_pieces(x)
    tl.store(sum_ptr + tl.arange(0, N), (p1.to(tl.float32) + p2.to(tl.float32)) + p3.to(tl.float32))
    tl.store(hi_ptr + tl.arange(0, N), common.tf32_high(x))


def test_fp32_splits_for_16_bit_tensor_cores_are_exact_enough():
    # the pieces that keep fp32-class products against a 16-bit tile: three bf16 pieces sum to x
    # within 2**-24 relative; the TF32 high part keeps 10 mantissa bits and the rest is below 2**-10 x
    x = torch.randn(64, device=KERNEL_DEVICE) * torch.logspace(-6, 6, 64, device=KERNEL_DEVICE)
    total, hi = torch.empty_like(x), torch.empty_like(x)
    _split_probe[(1,)](x, total, hi, N=64)
    assert ((total - x).abs() <= 2.0**-24 * x.abs()).all()
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()
    assert ((x - hi).abs() <= 2.0**-10 * x.abs()).all() and not torch.equal(hi, x)

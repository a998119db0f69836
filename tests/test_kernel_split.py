"""The low-rank passes with their reductions split over programs (``down``: K; ``dy``: N), and dA
split from the dX GEMM where its prologue would cap dX's tile.

``lora_configs.split_count`` gives each row tile's reduction to several programs when the row tiles
alone cannot fill the GPU; each program sums whole steps into a part of its own and the parts are
added in a fixed order. The dY pass sweeps its share of N from a step that depends on the row tile
(wrapping around) and adds dB into rows padded to R_PAD. Under the interpreter the split runs on
small odd shapes against the float64 spec, with the SM count set so that one, a few and every step
per program all occur (one step each never exercises the wrap-around).
"""

import pytest
import torch
from conftest import assert_close

from mbf import functional, reference

triton = pytest.importorskip("triton")
lora_kernel = pytest.importorskip("mbf.kernels.lora")
lora_configs = pytest.importorskip("mbf.kernels.lora_configs")
lora_op = pytest.importorskip("mbf.kernels.lora_op")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_split(tuner, M, length, block, element, **flags):
    """(row tiles, split, steps) the GPU rules give a launch of ``tuner`` over ``length``."""
    t = torch.empty(0, dtype=element)
    names = ("x_ptr", "a_ptr") if tuner is lora_kernel.down else ("dy_ptr", "b_ptr")
    kwargs = {names[0]: t, names[1]: t, "R_PAD": 16, "PRECISION": "tf32x3", **flags}
    kwargs["m_bucket"] = triton.next_power_of_2(M)
    split = lora_configs.split_count(tuner, M, length, block, lora_configs.SM_COUNT, kwargs)
    first = tuner.early_config_prune(tuner.configs, {}, **kwargs)[0].kwargs
    return triton.cdiv(M, first["BLOCK_M"]), split, triton.cdiv(length, first[block])


@pytest.mark.parametrize("element", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [1, 100, 512, 8192])
@pytest.mark.parametrize("length", [4096, 14336, 100])
def test_split_fills_the_gpu_without_idle_programs(monkeypatch, element, M, length):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU pruning and split rules
    target = lora_configs.WAVES * lora_configs.SM_COUNT
    for tuner, block, flags in (
        (lora_kernel.down, "BLOCK_K", {"HAS_DROPOUT": True}),
        (lora_kernel.dy, "BLOCK_N", {"ACC_DB": True}),
    ):
        tiles, split, steps = _gpu_split(tuner, M, length, block, element, **flags)
        most = max(1, steps // lora_configs.MIN_STEPS)
        assert 1 <= split <= most, (tuner.fn.__name__, split, most)
        want = min(triton.cdiv(target, tiles), most)  # parts for the target, unless the steps run out
        per = triton.cdiv(steps, split)
        assert per <= triton.cdiv(steps, want)  # no program longer than the wanted split's
        assert (split - 1) * per < steps  # and none without a step: the same steps, fewer parts
        assert 2 * tiles * split >= min(target, tiles * most)
        if tiles >= target:
            assert split == 1  # enough row tiles: no parts to add


def test_split_is_one_at_most_when_m_fills_the_gpu_alone(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiles, split, _ = _gpu_split(lora_kernel.dy, 2**17, 4096, "BLOCK_N", torch.bfloat16, ACC_DB=True)
    assert tiles >= lora_configs.WAVES * lora_configs.SM_COUNT and split == 1


def _inputs(M, K, N, r, dt, adt):
    g = lambda *s, scale=1.0: (torch.randn(*s) * scale).to(DEVICE)  # noqa: E731
    t = {
        "x": g(M, K).to(dt),
        "weight": g(N, K, scale=K**-0.5).to(dt),
        "bias": g(N).to(dt),
        "A": g(r, K, scale=K**-0.5).to(adt),
        "B": g(N, r, scale=r**-0.5).to(adt),  # random, never the zero init
        "merged_B": g(N, r, scale=r**-0.5).to(adt),
    }
    return t, g(M, N, scale=M**-0.5).to(dt)


# (x dtype, adapter dtype)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16-fp32-adapters": (torch.bfloat16, torch.float32)}  # fmt: skip


# (backend, dtypes, dropout p, M, r, SMs): each backend with no split, a few parts of a few steps, and
# one step per program; dropout on and off, fp32 and bf16 (adapters in x's dtype or fp32), M one row
# or five row tiles
SPLIT_CASES = {
    "triton-fp32-p0.3-M70-sms1": ("triton", "fp32", 0.3, 70, 5, 1),
    "triton-bf16-p0-M70-sms3": ("triton", "bf16", 0.0, 70, 5, 3),
    "triton-bf16-fp32-adapters-p0.3-M70-sms3": ("triton", "bf16-fp32-adapters", 0.3, 70, 5, 3),
    "triton-fp32-p0-M1-sms132": ("triton", "fp32", 0.0, 1, 16, 132),
    "triton-bf16-p0.3-M70-sms132": ("triton", "bf16", 0.3, 70, 16, 132),
    "hybrid-bf16-fp32-adapters-p0.3-M70-sms3": ("hybrid", "bf16-fp32-adapters", 0.3, 70, 5, 3),
    "hybrid-fp32-p0-M1-sms1": ("hybrid", "fp32", 0.0, 1, 16, 1),
    "hybrid-bf16-p0.3-M70-sms132": ("hybrid", "bf16", 0.3, 70, 5, 132),
}


@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_passes_match_reference(monkeypatch, case):
    """K = 72 and N = 90: five and six 16-wide steps (the interpreter's blocks), the last partial; M = 70:
    five row tiles, the last partial. One SM at M = 70: no split, every row tile sweeps all of N from
    its own step; three SMs: two parts of two or three steps each; 132: one step per program."""
    backend, dtypes, p, M, r, sms = case
    monkeypatch.setattr(lora_configs, "SM_COUNT", sms)
    splits = []

    def split_count(*args, _split=lora_op.split_count):
        splits.append(_split(*args))
        return splits[-1]

    monkeypatch.setattr(lora_op, "split_count", split_count)
    dt, adt = DTYPES[dtypes]
    t, dY = _inputs(M, 72, 90, r, dt, adt)
    kw = dict(scaling=0.75, lam=0.6, dropout=p, seed=2**40 + 3)
    leaves = {k: t[k].detach().requires_grad_() for k in ("x", "A", "B")}
    y = functional.lora_linear(**{**t, **leaves}, **kw, backend=backend)
    y.backward(dY)
    ref = {k: v.detach().double().requires_grad_(k in leaves) for k, v in t.items()}
    ct = torch.promote_types(dt, adt)
    y_ref = reference.lora_linear(**ref, **kw, compute_dtype=ct, out_dtype=dt)
    y_ref.backward(dY.double())

    assert len(splits) == 2  # the down pass and the dY pass
    if sms == 1 and M == 70:
        assert splits == [1, 1]
    if sms == 132:
        assert splits == [5, 6]  # every step its own program
    assert_close(y, y_ref, dt)
    assert_close(leaves["x"].grad, ref["x"].grad, dt)
    for name in ("A", "B"):
        assert leaves[name].grad.shape == t[name].shape
        assert_close(leaves[name].grad, ref[name].grad, adt)


@pytest.mark.parametrize(
    "x_dt,a_dt,p,M,apart",
    [
        (torch.bfloat16, torch.bfloat16, 0.0, 8192, True),  # the prologue caps the tile
        (torch.bfloat16, torch.float32, 0.0, 8192, True),
        (torch.float16, torch.float32, 0.0, 8192, True),
        (torch.float32, torch.float32, 0.0, 8192, True),
        (torch.bfloat16, torch.float32, 0.0, 512, False),  # too few wide tiles to fill the GPU
        (torch.bfloat16, torch.bfloat16, 0.1, 8192, False),  # the mask alone caps dX's tile
        (torch.bfloat16, torch.float32, 0.1, 8192, False),
    ],
)
def test_da_leaves_the_dx_prologue_where_it_caps_the_tile(monkeypatch, x_dt, a_dt, p, M, apart):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU budgets
    dY, A = torch.empty(M, 4096, dtype=x_dt), torch.empty(16, 4096, dtype=a_dt)
    seed = torch.zeros((), dtype=torch.int64) if p else None
    assert lora_op._da_apart(dY, A, seed, {"R_PAD": 16, "PRECISION": "tf32x3"}) == apart


@pytest.mark.parametrize("dtypes,p", [("bf16", 0.3), ("bf16-fp32-adapters", 0.0), ("fp32", 0.3)])
def test_da_apart_from_dx_matches_reference(monkeypatch, dtypes, p):
    """dA in a launch of its own (the dX kernel without its GEMM) and dX alone, against the spec."""
    monkeypatch.setattr(lora_op, "_da_apart", lambda *args: True)  # the interpreter's shapes are small
    launches, linear = [], lora_op._linear

    def record(*args, **kw):
        launches.append((kw["has_main"], args[7] is not None))  # (the GEMM, dA)
        return linear(*args, **kw)

    monkeypatch.setattr(lora_op, "_linear", record)
    dt, adt = DTYPES[dtypes]
    t, dY = _inputs(37, 40, 33, 6, dt, adt)
    kw = dict(scaling=0.75, lam=0.6, dropout=p, seed=5)
    leaves = {k: t[k].detach().requires_grad_() for k in ("x", "A", "B")}
    y = functional.lora_linear(**{**t, **leaves}, **kw, backend="triton")
    y.backward(dY)
    ref = {k: v.detach().double().requires_grad_(k in leaves) for k, v in t.items()}
    y_ref = reference.lora_linear(**ref, **kw, compute_dtype=torch.promote_types(dt, adt), out_dtype=dt)
    y_ref.backward(dY.double())
    assert launches == [(True, False), (True, False), (False, True)]  # y; dX alone; dA alone
    assert_close(y, y_ref, dt)
    assert_close(leaves["x"].grad, ref["x"].grad, dt)
    for name in ("A", "B"):
        assert_close(leaves[name].grad, ref[name].grad, adt)

"""NF4 storage: bitsandbytes' exact layout, bit-exact dequantisation, zero-copy conversion, errors."""

import importlib
import sys

import pytest
import torch
from torch import nn

from mbf import functional, nf4
from mbf.nn import NF4Linear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb():
    """bitsandbytes.functional, or a skip that says why and how to get it."""
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError:
        pytest.skip(
            "bitsandbytes is not installed (pip install mbf-lora[qlora]): no reference to compare with"
        )


def _weight(out_f: int, in_f: int, dtype: torch.dtype) -> torch.Tensor:
    # a heavy-tailed weight with a few outliers, so blocks get very different absmax values
    w = torch.randn(out_f, in_f) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (5,))] *= 40
    return w.to(dtype)


class _Param:  # what _from_bnb_param reads from a Params4bit
    def __init__(self, data, quant_state):
        self.data, self.quant_state = data, quant_state


def test_tables_equal_bitsandbytes():
    F = _bnb()
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())
    assert torch.equal(torch.tensor(nf4.NF4_CODE), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequant_bit_exact_to_bitsandbytes(dtype, double_quant):
    F = _bnb()
    W = _weight(67, 192, dtype)  # odd rows; 201 blocks, so the last 256-group of absmax is partial
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    w = nf4.weight_from_bnb(_Param(q, state), "test", None)
    assert w.packed.data_ptr() == q.data_ptr()  # a view, not a copy
    if double_quant:
        assert w.absmax.data_ptr() == state.absmax.data_ptr() and w.absmax.dtype == torch.uint8
    ours = nf4.dequantize_nf4(w)
    theirs = F.dequantize_4bit(q, state)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_bitsandbytes(dtype):
    """Our 4-bit codes are bnb's; our storage dequantises identically through bnb itself."""
    F = _bnb()
    W = _weight(33, 320, dtype)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = nf4.quantize_nf4(W)
    assert torch.equal(w.packed, q.view(-1))
    assert torch.equal(w.absmax_scale, state.state2.absmax) and torch.equal(w.absmax_offset, state.offset)
    # bnb's CPU kernel looks the 8-bit code up in a table and may miss the nearest one
    # (test_own_quantiser_is_not_bit_exact_to_bitsandbytes_but_nearer at a real size)
    differ = (w.absmax.int() - state.absmax.int()).abs()
    assert differ.max() <= 3 and (differ > 0).float().mean() < 0.05
    state2 = F.QuantState(absmax=w.absmax_scale, code=w.absmax_code, blocksize=256, dtype=torch.float32)
    ours_state = F.QuantState(
        absmax=w.absmax,
        shape=torch.Size(w.shape),
        code=w.code,
        blocksize=64,
        quant_type="nf4",
        dtype=dtype,
        offset=w.absmax_offset,
        state2=state2,
    )
    assert torch.equal(F.dequantize_4bit(w.packed.view(-1, 1), ours_state), nf4.dequantize_nf4(w))


# Real sizes: a 1024x4096 weight has 65,536 blocks of 64, so 256 groups of the nested 8-bit absmax (one
# fp32 scale per 256 blocks); the sizes above have at most one. 128x256 is the smallest with two groups.
REAL_SHAPES = [(128, 256, torch.bfloat16), (1024, 4096, torch.float32)]


def _grouped_weight(out_f: int, in_f: int, dtype: torch.dtype) -> torch.Tensor:
    """Every 256-group of blocks its own spread of absmax values (one group ×50, the next ×1/50...), so
    a block read with another group's nested scale is far off."""
    w = _weight(out_f, in_f, torch.float32).view(-1, 256 * 64)
    w *= torch.tensor([50.0, 0.02, 1.0, 7.0])[torch.arange(len(w)) % 4].view(-1, 1)
    return w.view(out_f, in_f).to(dtype)


@pytest.mark.parametrize("out_f,in_f,dtype", REAL_SHAPES)
def test_bit_exact_to_bitsandbytes_at_real_sizes(out_f, in_f, dtype):
    """bitsandbytes quantises (the reference), mbf dequantises: every element equal, every 256-group's
    nested scale read by its own blocks. ``mbf.nf4.quantize`` stores exactly bitsandbytes' tensors."""
    F = _bnb()
    W = _grouped_weight(out_f, in_f, dtype)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.state2.absmax.numel() == out_f * in_f // 64 // 256 >= 2
    w = nf4.weight_from_bnb(_Param(q, state), "test", None)
    assert torch.equal(nf4.dequantize_nf4(w), F.dequantize_4bit(q, state))
    ours = nf4.quantize(W)  # bitsandbytes installed: its quantiser, so its storage to the bit
    assert torch.equal(ours.packed, q.view(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(ours.absmax_offset, state.offset)


def test_own_quantiser_is_not_bit_exact_to_bitsandbytes_but_nearer():
    """Without bitsandbytes ``mbf.nf4.quantize`` is ``quantize_nf4``, whose storage is NOT bitsandbytes'
    to the bit: its 4-bit codes, nested scales and offset are, but bitsandbytes' CPU kernel (0.50) looks
    each nested 8-bit absmax code up in a 65,536-entry table over [-1, 1] and, within a bin (3e-5) of a
    midpoint or near 0 where the dynamic map's steps are finer than a bin, keeps a neighbour of the
    nearest code (up to 3 codes away; 132 of 65,536 blocks here). ``quantize_nf4`` picks the nearest, so
    its block scale is never farther from the block's true absmax than bitsandbytes'."""
    F = _bnb()
    W = _weight(1024, 4096, torch.float32)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = nf4.quantize_nf4(W)
    assert torch.equal(w.packed, q.view(-1))
    assert torch.equal(w.absmax_scale, state.state2.absmax) and torch.equal(w.absmax_offset, state.offset)
    differ = w.absmax != state.absmax
    assert int(differ.sum()) < 0.01 * differ.numel()
    assert differ.any(), "bitsandbytes now picks the nearest nested code: update quantize_nf4's docs"
    true = W.view(-1, 64).abs().amax(dim=1)
    theirs = nf4.weight_from_bnb(_Param(q, state), "test", None).block_scales()
    ours_err, their_err = (w.block_scales() - true).abs(), (theirs - true).abs()
    assert bool((ours_err <= their_err).all())
    assert bool((ours_err[differ] < their_err[differ]).all())


def test_quantize_without_bitsandbytes_is_the_own_quantiser(monkeypatch):
    """Which quantiser stores the weight: bitsandbytes' when importable, else ``quantize_nf4``."""
    W = _grouped_weight(128, 256, torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    got, want = nf4.quantize(W), nf4.quantize_nf4(W)
    for name in ("packed", "absmax", "absmax_scale", "absmax_offset", "absmax_code", "code"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_nested_scale_of_block_b_is_group_b_over_256():
    """``absmax[b] = code[q[b]] · absmax_scale[b // 256] + offset``: every block's scale within half the
    widest step of the dynamic map times ITS group's scale of the true absmax (no bitsandbytes needed)."""
    W = _grouped_weight(256, 512, torch.float32)  # 2,048 blocks: 8 groups, the scales 50 and 1/50 apart
    w = nf4.quantize_nf4(W)
    true = W.view(-1, 64).abs().amax(dim=1)
    group_scale = w.absmax_scale[torch.arange(true.numel()) // 256]
    half_step = (nf4.dynamic_map().diff().max() / 2).item()
    err = (w.block_scales() - true).abs()
    assert bool((err <= half_step * group_scale * (1 + 1e-5) + 1e-7 * true).all())
    assert w.absmax_scale.max() / w.absmax_scale.min() > 100  # the groups' scales do differ


def test_layout_high_nibble_first():
    """Hand-built storage: byte 0x0F holds code 0 (-1.0) first, then code 15 (+1.0)."""
    packed = torch.full((32,), 0x0F, dtype=torch.uint8)  # one row of 64 = one block
    code = torch.tensor(nf4.NF4_CODE)
    w = nf4.NF4Weight(packed, torch.tensor([2.5]), None, None, None, code, (1, 64), torch.float32)
    row = nf4.dequantize_nf4(w)[0]
    assert torch.equal(row[0::2], torch.full((32,), -2.5)) and torch.equal(row[1::2], torch.full((32,), 2.5))


def test_quantisation_error_is_nf4s():
    """Round trip error per block ≤ half the widest NF4 gap times the block's absmax."""
    W = _weight(40, 128, torch.float32)
    w = nf4.quantize_nf4(W)
    err = (nf4.dequantize_nf4(w) - W).abs().view(-1, 64)
    absmax = W.abs().view(-1, 64).amax(1, keepdim=True)
    absmax_err = (w.block_scales().view(-1, 1) - absmax).abs()  # the 8-bit double quant's share
    gap = max(b - a for a, b in zip(nf4.NF4_CODE, nf4.NF4_CODE[1:]))
    assert (err <= absmax * gap / 2 + absmax_err + 1e-7).all()
    assert err.max() > 0 and absmax_err.max() > 0  # it did quantise, both levels


def test_memory_about_half_a_byte_per_weight():
    w = nf4.quantize_nf4(torch.randn(1024, 4096))
    per_weight = w.nbytes() / (1024 * 4096)
    assert 0.515 < per_weight < 0.52, per_weight  # 0.5 + 1/64 + 4/(64·256) + the tables


def test_nf4linear_forward_and_buffers_follow_to():
    lin = nn.Linear(128, 19, dtype=torch.float32)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, layer.dequantize(), lin.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    sd = layer.state_dict()
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].numel() == 19 * 128 // 2
    layer.to(torch.device("meta"))
    assert layer.nf4.device.type == "meta" and layer.absmax_code.device.type == "meta"


def test_bnb_linear4bit_converts_zero_copy():
    bnb = pytest.importorskip(
        "bitsandbytes",
        reason="bitsandbytes is not installed (pip install mbf-lora[qlora])",
        exc_type=ImportError,
    )
    lin = bnb.nn.Linear4bit(128, 24, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin = lin.to("cpu")  # bnb quantises on the move to a device
    layer = NF4Linear.from_bnb(lin)
    assert layer.weight_packed.data_ptr() == lin.weight.data_ptr()
    assert layer.absmax.data_ptr() == lin.weight.quant_state.absmax.data_ptr()
    assert layer.compute_dtype == torch.bfloat16 and layer.restore() is lin
    ref = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(layer.dequantize(), ref)
    back = layer.to_bnb()  # and back to bnb, sharing the tensors
    assert back.weight.data_ptr() == lin.weight.data_ptr()
    assert torch.equal(bnb.functional.dequantize_4bit(back.weight.data, back.weight.quant_state), ref.float())


def test_bnb_cpu_repacked_weight_is_unpacked():
    """bnb repacks a CPU Linear4bit in place for its inference kernel (bf16 absmax, lossy); conversion
    undoes that with bnb's own inverse, so both libraries then read the same weight."""
    bnb = pytest.importorskip(
        "bitsandbytes",
        reason="bitsandbytes is not installed (pip install mbf-lora[qlora])",
        exc_type=ImportError,
    )
    lin = bnb.nn.Linear4bit(128, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    before = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 128))  # repacks on AVX512-BF16 CPUs
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    with pytest.warns(UserWarning, match="repacked"):
        layer = NF4Linear.from_bnb(lin, name="q_proj")
    after = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(layer.dequantize(torch.float32), after)
    torch.testing.assert_close(after, before, rtol=2e-2, atol=1e-3)  # bf16 absmax, re-quantised


def test_errors_fp4_and_blocksize():
    F = _bnb()
    W = _weight(8, 128, torch.float32)
    q, state = F.quantize_4bit(W, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="q_proj: 4-bit quant_type 'fp4' is not supported"):
        nf4.weight_from_bnb(_Param(q, state), "q_proj", None)
    q, state = F.quantize_4bit(W, blocksize=128, quant_type="nf4")
    with pytest.raises(ValueError, match="q_proj: 4-bit blocksize 128 is not supported; only 64"):
        nf4.weight_from_bnb(_Param(q, state), "q_proj", None)
    with pytest.raises(ValueError, match="v_proj: in_features 100 must be a multiple of 64"):
        nf4.quantize_nf4(torch.randn(4, 100), name="v_proj")


def test_error_bitsandbytes_missing(monkeypatch):
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"pip install mbf-lora\[qlora\]"):
        layer.to_bnb()


def test_error_device():
    w = nf4.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="q_proj: backend='triton' needs the NF4 weight on a CUDA device"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")
            functional.lora.check_nf4_device(w, torch.randn(2, 64), "triton", "q_proj: ")
    meta = NF4Linear(w).to("meta").nf4
    with pytest.raises(RuntimeError, match="q_proj: NF4 weight on meta cannot run"):
        functional.lora.check_nf4_device(meta, torch.randn(2, 64), "torch", "q_proj: ")
    with pytest.raises(ValueError, match="q_proj: input on meta but the NF4 weight on cpu"):
        functional.lora.check_nf4_device(w, torch.randn(2, 64, device="meta"), "torch", "q_proj: ")


def test_bnb_linear4bit_not_yet_quantised_is_quantised_like_bnb():
    """A Linear4bit that never moved to a device still holds dense data: we quantise it as bnb would."""
    bnb = pytest.importorskip(
        "bitsandbytes",
        reason="bitsandbytes is not installed (pip install mbf-lora[qlora])",
        exc_type=ImportError,
    )
    lin = bnb.nn.Linear4bit(128, 24, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert lin.weight.quant_state is None
    layer = NF4Linear.from_bnb(lin)
    moved = lin.to("cpu")  # now bitsandbytes quantises the same data
    qs = moved.weight.quant_state
    assert torch.equal(layer.weight_packed, moved.weight.data.view(-1))
    assert torch.equal(layer.absmax_scale, qs.state2.absmax) and torch.equal(layer.absmax_offset, qs.offset)
    assert torch.equal(layer.absmax, qs.absmax)  # bitsandbytes quantised it: its ties too (mbf.nf4.quantize)

"""The options the compile check drives each public launcher with: their domain, and nothing else.

Every function here calls a launcher of ``mbf.kernels`` the way the library calls it, once per
combination of the options a user controls (dtypes, bias, merged B, dropout, which gradients, rank,
TF32, deterministic mode, token count). Which kernels run, with which constexprs, signatures and
autotune configs is decided by the launchers themselves and recorded by ``aot.record``; nothing
here names a constexpr. The tensors are uninitialised CPU tensors: no kernel runs.

Sizes are Llama-like where Triton specialises on them (multiples of 16, unit inner strides); the
rank and the token count are never specialised (the kernels mark them ``do_not_specialize``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch

__all__ = ["CASES", "M_VALUES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RANKS = (16, 32, 64, 128)  # one per padded rank tile; 1-15 pad to 16 like 16 (same binary)
M_VALUES = tuple(2**i for i in range(17))  # token counts 1 ... 65536: every M bucket and threshold
_SIZE = 256  # in / out features: a multiple of 64 (NF4 blocks) and of every tile's alignment


@contextlib.contextmanager
def _torch_flags(*, tf32: bool, deterministic: bool):
    """torch's TF32 and determinism switches as the launchers read them (restored afterwards)."""
    from mbf.kernels import _common

    fill = torch.utils.deterministic
    saved = _common.tf32_allowed, torch.are_deterministic_algorithms_enabled(), fill.fill_uninitialized_memory
    _common.tf32_allowed = lambda t: tf32  # CPU tensors: stand in for a CUDA tensor's TF32 flag
    torch.use_deterministic_algorithms(deterministic)
    fill.fill_uninitialized_memory = False  # nothing reads the tensors: spare the NaN fill
    try:
        yield
    finally:
        _common.tf32_allowed = saved[0]
        torch.use_deterministic_algorithms(saved[1])
        fill.fill_uninitialized_memory = saved[2]


def _empty(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def lora_cases() -> Iterator[Callable[[], None]]:
    """``mbf.kernels.lora_op.lora_linear`` forward and backward over its whole option domain."""
    from mbf.kernels.lora_op import keep_mask, lora_linear
    from mbf.kernels.route import MAX_RANK

    yield lambda: keep_mask(64, 64, 2**31, torch.zeros((), dtype=torch.int64))  # the torch paths on CUDA

    ranks = [r for r in RANKS if r <= MAX_RANK]  # the op refuses wider ranks (the torch path runs them)
    needs = [n for n in itertools.product((False, True), repeat=3) if any(n)]  # grads of x, A, B
    for x_dt in DTYPES:
        for ad_dt in dict.fromkeys((x_dt, torch.float32)):  # adapters in x's dtype, or fp32
            fp32 = torch.float32 in (x_dt, ad_dt)
            for tf32, det, r, merged, p, (gx, ga, gb) in itertools.product(
                (False, True) if fp32 else (False,), (False, True), ranks, (False, True), (0.0, 0.1), needs
            ):
                for bias in (False, True):

                    def run(x_dt=x_dt, ad_dt=ad_dt, tf32=tf32, det=det, r=r, merged=merged, p=p, bias=bias,
                            g=(gx, ga, gb)):  # fmt: skip
                        M = K = N = 64
                        x = _empty(M, K, dtype=x_dt, grad=g[0])
                        A, B = _empty(r, K, dtype=ad_dt, grad=g[1]), _empty(N, r, dtype=ad_dt, grad=g[2])
                        W, b = _empty(N, K, dtype=x_dt), _empty(N, dtype=x_dt) if bias else None
                        Bm = _empty(N, r, dtype=ad_dt) if merged else None
                        with _torch_flags(tf32=tf32, deterministic=det):
                            y = lora_linear(x, W, b, A, B, 2.0, Bm, 0.5, dropout=p, seed=7)
                            y.backward(torch.empty_like(y))

                    yield run


def nf4_cases() -> Iterator[Callable[[], None]]:
    """``mbf.kernels.nf4``'s dequant pass and fused addmm (forward, dX) at every token count."""
    from mbf.kernels import nf4

    N = K = _SIZE
    packed, scales = _empty(N * K // 2, dtype=torch.uint8), _empty(N * K // 64, dtype=torch.float32)
    code = _empty(16, dtype=torch.float32)
    storage = (packed, scales, code, (N, K))
    for dt in DTYPES:
        yield lambda dt=dt: nf4.nf4_dequantize(*storage, dt)
        for tf32, M in itertools.product((False, True) if dt == torch.float32 else (False,), M_VALUES):

            def run(dt=dt, tf32=tf32, M=M):
                x, dy = _empty(M, K, dtype=dt), _empty(M, N, dtype=dt)
                with _torch_flags(tf32=tf32, deterministic=False):
                    nf4.nf4_addmm(_empty(M, N, dtype=dt), x, *storage, True)  # forward
                    nf4.nf4_addmm(_empty(M, K, dtype=dt), dy, *storage, False)  # dX

            yield run


def ortho_cases() -> Iterator[Callable[[], None]]:
    """``mbf.kernels.ortho``: the batched QR at every rank up to MAX_RANK and the projection."""
    from mbf.kernels import ortho

    for dt in DTYPES:
        for r in (2**i for i in range(8)):  # every padded rank 1 ... 128
            yield lambda dt=dt, r=r: ortho.orthonormal_rows_many([torch.zeros(r, _SIZE, dtype=dt)], 1e-6)
        for k, r in itertools.product(RANKS, RANKS):
            yield lambda dt=dt, k=k, r=r: ortho.project_out(
                _empty(3, k, _SIZE, dtype=dt), _empty(3, r, _SIZE, dtype=dt)
            )


def merge_cases() -> Iterator[Callable[[], None]]:
    """``mbf.kernels.merge``: every (merged, fine-tuned) dtype pair."""
    from mbf.kernels import merge

    for m_dt, f_dt in itertools.product(DTYPES, DTYPES):
        yield lambda m_dt=m_dt, f_dt=f_dt: merge.time_aware_merge_(
            [_empty(_SIZE, 16, dtype=m_dt)], [_empty(_SIZE, 16, dtype=f_dt)], 0.5
        )


CASES = {"lora": lora_cases, "nf4": nf4_cases, "ortho": ortho_cases, "merge": merge_cases}

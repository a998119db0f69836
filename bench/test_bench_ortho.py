"""SLAO's task boundary for every adapter of a model: orthonormalise all A (step 2), merge all B (step 3).

Models: Llama-3-8B (32 layers × q, k, v, o, gate, up, down = 224 adapters) at r ∈ {8, 16, 64} and
SmolLM2-135M (30 layers × 7 = 210 adapters). Providers, all through ``mbf.functional`` or its spec:

- ``triton-batched``: ``orthonormal_rows`` / ``time_aware_merge`` with ``backend="triton"`` (one
  launch per shape group for the QR, one launch for the whole merge). CUDA only.
- ``torch-batched``: the same calls with ``backend="torch"`` (stacked ``torch.linalg.qr`` per shape
  group; one ``torch._foreach_lerp_`` for the merge).
- ``torch-loop``: what one writes without batching: ``reference.orthonormal_rows`` (a
  ``torch.linalg.qr`` + sign fix) and ``reference.time_aware_merge`` layer by layer.

Every row: ms (median, p20, p80), GB/s of the minimal traffic (QR: read A + write Q; merge: read
B_m, B_ft + write B_m), and ``ratio_to_baseline``: ms / ms of ``torch-loop`` measured in the same run
(larger = slower).
Run: ``python -m pytest bench/test_bench_ortho.py -q -s``. On a machine without CUDA only the torch
providers run, at SmolLM2 size and Llama-3-8B r = 8, on one thread (see ``_one_cpu_thread``). It
never asserts a speed.
"""

from __future__ import annotations

import pytest
import torch

from mbf import functional, reference
from mbf.bench.rows import device_name, timed_row
from mbf.bench.timing import peak_memory, time_fn

# (layers, [(in, out) of q, k, v, o, gate, up, down]); A is (r, in), B is (out, r)
MODELS = {
    "llama-3-8b": (32, [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                        (4096, 14336), (4096, 14336), (14336, 4096)]),
    "smollm2-135m": (30, [(576, 576), (576, 192), (576, 192), (576, 576),
                          (576, 1536), (576, 1536), (1536, 576)]),
}  # fmt: skip
RANKS = (8, 16, 64)
PROVIDERS = ("torch-loop", "torch-batched", "triton-batched")  # the loop first: the others' reference
REFERENCES = {"boundary_ortho": "torch-loop", "boundary_merge": "torch-loop"}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32  # adapters are trained in fp32; QR and merge run in fp32 whatever the dtype


def _adapters(model: str, r: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(A list, merged-B list, fine-tuned-B list) of every adapted linear of ``model``, random."""
    torch.manual_seed(0)
    n_layers, linears = MODELS[model]
    As, Bm, Bf = [], [], []
    for _ in range(n_layers):
        for in_f, out_f in linears:
            As.append(torch.randn(r, in_f, device=DEVICE, dtype=DTYPE))
            Bm.append(torch.randn(out_f, r, device=DEVICE, dtype=DTYPE))
            Bf.append(torch.randn(out_f, r, device=DEVICE, dtype=DTYPE))
    return As, Bm, Bf


def _skip_reason(provider: str, model: str, r: int) -> str | None:
    if provider == "triton-batched" and not CUDA:
        return "the Triton providers need a CUDA GPU"
    if not CUDA and model == "llama-3-8b" and r != 8:
        return "CPU: Llama-3-8B only at r = 8 (the torch loop at r >= 16 takes minutes)"
    return None


def _ortho_fn(provider: str, As: list[torch.Tensor]):
    if provider == "torch-loop":
        return lambda: [reference.orthonormal_rows(A) for A in As]
    backend = "triton" if provider == "triton-batched" else "torch"
    return lambda: functional.orthonormal_rows(As, backend=backend)


def _merge_fn(provider: str, Bm: list[torch.Tensor], Bf: list[torch.Tensor]):
    if provider == "torch-loop":

        def loop():
            for m, f in zip(Bm, Bf):
                m.copy_(reference.time_aware_merge(m, f, 0.5))

        return loop
    backend = "triton" if provider == "triton-batched" else "torch"
    return lambda: functional.time_aware_merge_(Bm, Bf, 0.5, backend=backend)


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    # CPU rows use one thread: with two OpenMP threads on a shared machine, every small op waits on
    # the other thread and the per-layer loop and the batched call swing by 10-100x between runs.
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("op", ["ortho", "merge"])
def test_bench_task_boundary(op, model, r, provider, rows):
    reason = _skip_reason(provider, model, r)
    if reason:
        pytest.skip(reason)
    As, Bm, Bf = _adapters(model, r)
    if op == "ortho":
        fn = _ortho_fn(provider, As)
        nbytes = 2 * sum(A.numel() for A in As) * As[0].element_size()
    else:
        fn = _merge_fn(provider, Bm, Bf)
        nbytes = 3 * sum(B.numel() for B in Bm) * Bm[0].element_size()
    with torch.no_grad():
        t = time_fn(fn, DEVICE, warmup=2, rep=10)
        peak = peak_memory(fn, DEVICE)
    # M: the adapters in the model; extra_keys: the README table's "extra" column
    case = dict(op=f"boundary_{op}", provider=provider, mode="fwd", shape=model, M=len(As), r=r)
    threads = None if CUDA else torch.get_num_threads()
    extra = dict(peak_mem_bytes=peak, threads=threads, extra_keys=["gbps", "threads"])
    dtype, device = str(DTYPE).removeprefix("torch."), device_name(DEVICE)
    rows.append(timed_row(**case, dtype=dtype, device=device, timing=t, nbytes=nbytes, **extra))

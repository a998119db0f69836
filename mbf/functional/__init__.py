"""The functional API of mbf: every kernel with its backend dispatch.

CUDA tensors take the Triton kernels of ``mbf.kernels`` (the LoRA linear: whichever of its paths
``dispatch.py`` measured fastest on this GPU, by the route of ``mbf.kernels.route``); CPU tensors take
the PyTorch path; ``backend="triton"|"torch"|"hybrid"`` (or ``$MBF_BACKEND``) forces one.
``mbf.reference`` is the specification of each function.

- ``lora_linear`` (``lora_linear_nf4``): the LoRA linear over a dense or NF4 base (``lora.py``,
  base GEMMs in ``bases.py``);
- ``orthonormal_rows``, ``project_out``, ``project_out_all``: SLAO's QR init and the strict mode's
  projection, batched over a model (``ortho.py``);
- ``time_aware_merge_``: SLAO's merge of every layer at once, in place (``merge.py``).
"""

from mbf.functional._backend import BACKENDS, resolve_backend
from mbf.functional.lora import MAX_FUSED_RANK, LoRALinearFunction, lora_linear, lora_linear_nf4
from mbf.functional.merge import time_aware_merge_
from mbf.functional.ortho import DEPENDENT_ROW_TOL, orthonormal_rows, project_out, project_out_all

__all__ = [
    "BACKENDS",
    "DEPENDENT_ROW_TOL",
    "MAX_FUSED_RANK",
    "LoRALinearFunction",
    "lora_linear",
    "lora_linear_nf4",
    "orthonormal_rows",
    "project_out",
    "project_out_all",
    "resolve_backend",
    "time_aware_merge_",
]

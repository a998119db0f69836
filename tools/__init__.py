"""Developer tools of the repository (never installed, never imported by ``mbf`` at run time).

- ``compile_check``: every Triton kernel variant compiled for sm_90 and sm_80 on a CPU, through
  Triton's public compile API (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``), so it
  runs under every Triton the kernels support (tested: 3.6 and 3.9). Run from the repository root:
  ``python -m tools.compile_check``.
"""

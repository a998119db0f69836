"""Triton kernels of mbf (installed as ``mbf.kernels``): launchers and autograd Functions only.

Nothing here knows about nn.Module or transformers. Each module imports triton at its own import,
so ``import mbf`` never needs triton.
"""

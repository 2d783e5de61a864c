"""Triton kernels of rftengine, installed as `rftengine.kernels`.

One module per kernel family; each holds `@triton.jit` kernels and their launchers only.
Never import this folder as a top-level `kernels` package: that name belongs to a Hugging
Face package that transformers may import.
"""

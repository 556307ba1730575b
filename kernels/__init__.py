"""Numerics shared by compression, export and the backends.

``quantize``: symmetric INT8 quantization of weights (per output channel) and activations (per
tensor), and the choice of clipping values. Reference implementations in NumPy; fast paths for a
GPU arrive with the kernels that need them, each checked against its reference.
"""

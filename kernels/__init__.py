"""Numerics shared by compression, export and the backends, each a reference implementation.

- ``quantize``: symmetric INT8 quantization of weights (per output channel) and activations (per
  tensor), and the choice of clipping values (NumPy, used by calibration and the QDQ writer).
- ``sparsity``: 2:4 semi-structured masks along the reduction axis, compressed storage, and the
  SR-STE autograd function for training masked weights (PyTorch).
- ``int4``: symmetric group-wise INT4 weight quantization and the ONNX nibble packing (PyTorch).

Fast GPU paths arrive with the kernels that need them, each checked against its reference.
"""

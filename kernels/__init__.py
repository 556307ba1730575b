"""Numerics shared by compression, export and the backends, each a reference implementation.

- ``quantize``: symmetric INT8 quantization of weights (per output channel) and activations (per
  tensor), and the choice of clipping values (NumPy, used by calibration and the QDQ writer).
- ``sparsity``: 2:4 semi-structured masks along the reduction axis, compressed storage, and the
  SR-STE autograd function for training masked weights (PyTorch).
- ``int4``: symmetric group-wise INT4 weight quantization and the ONNX nibble packing (PyTorch).

Fast GPU paths sit beside their references, each checked against them (Triton, imported only by
these modules, which import without it):

- ``triton_fq24``: the 2:4 mask and weight fake quantization fused in one kernel, with the
  autograd function CompressedLinear trains through on a GPU.
- ``triton_int4``: the INT4 weight-only GEMM that dequantizes in registers.
"""

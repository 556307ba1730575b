"""The GEMMs a compressed linear layer runs as, on PyTorch's own kernels, with a reference each.

One weight ``w [N, K]`` (output channels first), one input ``x [M, K]``:

- :func:`int8_gemm`: W8A8, ``x`` already quantized to int8, per-channel weight scales folded
  with the activation scale into ``alpha [N]``: ``y = (xq @ wq.T) * alpha`` (``torch._int_mm``,
  cuBLASLt's int8 tensor-core GEMM on CUDA, int32 accumulation);
- :func:`sparse_int8_gemm`: the same with ``wq`` 2:4 sparse, compressed once by
  :func:`compress_2_4_weight` (cuSPARSELt's sparse int8 GEMM, ``alpha`` applied per output
  channel inside it);
- :func:`sparse_float_gemm`: a 2:4 sparse fp16/bf16 weight (cuSPARSELt);
- INT4 weight-only GEMMs live in :mod:`deploycomp.kernels.triton_int4`.

``*_reference`` functions compute the same in fp32 from the uncompressed operands; tests and the
engine build check the fast paths against them. Nothing here is called without a caller asking for
a CUDA kernel: on a CPU only :func:`int8_gemm` runs (``torch._int_mm`` has a CPU kernel).
"""

from __future__ import annotations

import torch

# torch._int_mm on CUDA needs more than 16 rows and K, N multiples of 8; below that a float GEMM
# of the int8 values is exact (|products| <= 2^14, sums accumulate in fp32) and as fast.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8


def sparse_kernels_available() -> bool:
    """Whether cuSPARSELt's 2:4 GEMMs can run here (a CUDA GPU of sm_80 or newer and PyTorch
    built with cuSPARSELt)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return bool(cusparselt is not None and cusparselt.is_available())


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, -128, 127)`` as int8, computed in fp32 (the
    rounding of ONNX QuantizeLinear: half to even)."""
    q = torch.round(x.float() / scale) + zero_point
    return q.clamp_(-128, 127).to(torch.int8)


def int8_gemm(xq: torch.Tensor, wq: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype):
    """``(xq [M, K] @ wq [N, K].T) * alpha [N]`` in ``out_dtype``; int32 accumulation.

    Example:
        >>> y = int8_gemm(xq, wq, x_scale * w_scales, torch.float16)
    """
    m, k = xq.shape
    n = wq.shape[0]
    if xq.is_cuda and (m < INT_MM_MIN_ROWS or k % INT_MM_MULTIPLE or n % INT_MM_MULTIPLE):
        acc = xq.to(torch.float32) @ wq.to(torch.float32).t()
        return (acc * alpha).to(out_dtype)
    acc = torch._int_mm(xq, wq.t())
    return (acc.to(torch.float32) * alpha).to(out_dtype)


def int8_gemm_reference(xq: torch.Tensor, wq: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """:func:`int8_gemm` in float64 on the CPU, returned as float32."""
    acc = xq.cpu().double() @ wq.cpu().double().t()
    return (acc * alpha.cpu().double()).float()


def compress_2_4_weight(weight: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's compressed form of a 2:4 sparse CUDA weight ``[N, K]`` (int8, fp16 or bf16);
    pass it to :func:`sparse_int8_gemm` / :func:`sparse_float_gemm`."""
    return torch._cslt_compress(weight.contiguous())


def sparse_int8_gemm(
    xq: torch.Tensor, compressed: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`int8_gemm` with the weight 2:4 sparse: cuSPARSELt computes ``wq @ xq.T`` with
    ``alpha`` scaling each output channel, written transposed into ``[M, N]``."""
    out = torch._cslt_sparse_mm(
        compressed, xq.t(), alpha=alpha.to(torch.float32), out_dtype=out_dtype
    )
    return out.t()


def sparse_float_gemm(x: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ w.T`` with ``w [N, K]`` 2:4 sparse in x's float dtype (cuSPARSELt)."""
    return torch._cslt_sparse_mm(compressed, x.t()).t()

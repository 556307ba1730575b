"""Fused 2:4 mask + symmetric weight fake quantization for quantization-aware training on a GPU.

Takes a weight ``[N, K]`` and positive scales (one per output channel, ``[N]``, or one per group of
``K / G`` consecutive elements, ``[N, G]``) and returns the fake-quantized weight
``clamp(round(w / s), -qmax, qmax) * s`` of the weights the 2:4 mask keeps (0 elsewhere) together
with that mask. :func:`fake_quant_2_4` does it in one Triton kernel that reads the weight once;
:func:`fake_quant_2_4_reference` is the same in plain PyTorch, built from
:func:`~deploycomp.kernels.sparsity.mask_2_4` and the rounding of the project's LSQ fake quantizer
(``compress/fake_quant.py``). The two agree bit for bit: the kernel divides with IEEE rounding,
rounds half to even and writes a zero as +0.0, exactly as the PyTorch path does.
:func:`fake_quant_2_4_ste` wraps the kernel in an autograd function whose backward is the SR-STE
and LSQ gradient, computed in PyTorch op for op as autograd computes it through the unfused path.

Triton is optional: this module imports without it, and its kernels raise a clear error when
Triton is missing or a tensor is not on a CUDA GPU (with ``TRITON_INTERPRET=1`` set before this
module is imported, the kernel runs on CPU tensors in Triton's interpreter).
"""

from __future__ import annotations

import torch

from deploycomp.kernels.sparsity import GROUP_SIZE, mask_2_4

try:  # optional: ships with PyTorch's CUDA builds; everything else here needs only torch
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the installation
    triton = tl = None
    _TRITON_IMPORT_ERROR: ImportError | None = err
else:
    _TRITON_IMPORT_ERROR = None

MAX_QMAX = 2**21
_BLOCK_N = 16
_BLOCK_K = 128
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:
    # Kernels here call Triton builtins only, never the library's own @jit helpers (tl.cdiv,
    # tl.zeros, tl.sum): those are compiled or interpreted according to how triton itself was first
    # imported, which would tie the interpreter to processes that set TRITON_INTERPRET beforehand.

    @triton.jit
    def _keep_2_of_4(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """int8 [BLOCK_N, BLOCK_K]: 1 where ``mask_2_4`` keeps the element, else 0."""
        mag = tl.abs(w)
        # NaN ranks as the largest, as in mask_2_4 (x != x is the NaN test that compiles everywhere)
        mag = tl.where(mag != mag, float("inf"), mag)  # noqa: PLR0124
        # Element 4g + 2p + q of a row lands at [g, p, q]; two splits give the four slots.
        quads = tl.reshape(mag, (BLOCK_N, BLOCK_K // 4, 2, 2))
        even, odd = tl.split(quads)
        m0, m2 = tl.split(even)
        m1, m3 = tl.split(odd)
        # Element j beats element i if it is larger, or equal and earlier (j < i).
        rank0 = (m1 > m0).to(tl.int8) + (m2 > m0).to(tl.int8) + (m3 > m0).to(tl.int8)
        rank1 = (m0 >= m1).to(tl.int8) + (m2 > m1).to(tl.int8) + (m3 > m1).to(tl.int8)
        rank2 = (m0 >= m2).to(tl.int8) + (m1 >= m2).to(tl.int8) + (m3 > m2).to(tl.int8)
        rank3 = (m0 >= m3).to(tl.int8) + (m1 >= m3).to(tl.int8) + (m2 >= m3).to(tl.int8)
        keep_even = tl.join((rank0 < 2).to(tl.int8), (rank2 < 2).to(tl.int8))
        keep_odd = tl.join((rank1 < 2).to(tl.int8), (rank3 < 2).to(tl.int8))
        return tl.reshape(tl.join(keep_even, keep_odd), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _bfloat16_value(x):
        """float32 ``x`` rounded to the nearest bfloat16, ties to even, still as float32.

        Written out in integer arithmetic because Triton's interpreter truncates a float32 to
        bfloat16 cast; the compiled cast rounds to nearest even, and so does this.
        """
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # noqa: PLR0124 (NaN)

    @triton.jit
    def _fake_quant_2_4_kernel(
        w_ptr,
        scale_ptr,
        mask_in_ptr,
        out_ptr,
        mask_out_ptr,
        N,
        K,
        scales_per_row,
        elements_per_scale,
        QMAX: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BFLOAT16: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < N) & (cols[None, :] < K)
        offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_in_ptr + offsets, mask=inside, other=0) != 0
        else:
            keep8 = _keep_2_of_4(w, BLOCK_N, BLOCK_K)
            tl.store(mask_out_ptr + offsets, keep8.to(tl.uint8), mask=inside)
            keep = keep8 != 0
        scale_offsets = rows[:, None] * scales_per_row + cols[None, :] // elements_per_scale
        scale = tl.load(scale_ptr + scale_offsets, mask=inside, other=1.0).to(tl.float32)
        out_dtype = out_ptr.dtype.element_ty
        # Divide with IEEE rounding (plain `/` is approximate on NVIDIA GPUs) and round the
        # quotient to the weight's dtype, as PyTorch's half-precision division does.
        v = tl.math.div_rn(tl.where(keep, w, 0.0), scale)
        if BFLOAT16:
            v = _bfloat16_value(v)
        else:
            v = v.to(out_dtype).to(tl.float32)
        c = tl.maximum(v, -QMAX, propagate_nan=tl.PropagateNan.ALL)
        c = tl.minimum(c, QMAX, propagate_nan=tl.PropagateNan.ALL)
        # Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an
        # integer, ties to even (the hardware's rounding); libdevice's rint has no interpreter
        # implementation, and MAX_QMAX keeps |c| in range.
        r = (c + 12582912.0) - 12582912.0
        r = (r - c) + c  # the forward value of the straight-through round: a zero comes out +0.0
        out = r * scale
        if BFLOAT16:
            out = _bfloat16_value(out)
        tl.store(out_ptr + offsets, out.to(out_dtype), mask=inside)


def _kernels_interpreted() -> bool:
    return triton is not None and type(_fake_quant_2_4_kernel).__name__ == "InterpretedFunction"


def _require_kernel(*tensors: torch.Tensor) -> None:
    """Raise unless the Triton kernel can run on ``tensors``."""
    if triton is None:
        raise RuntimeError(
            f"fake_quant_2_4 needs Triton, which is not importable here ({_TRITON_IMPORT_ERROR!r});"
            f" install a CUDA build of PyTorch (it ships Triton) or call fake_quant_2_4_reference"
        )
    if not _kernels_interpreted() and not all(t.is_cuda for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"fake_quant_2_4 runs on CUDA tensors, got tensors on {devices}; move them to the GPU, "
            f"call fake_quant_2_4_reference, or set TRITON_INTERPRET=1 before importing this module"
        )


def _checked(
    weight: torch.Tensor, scale: torch.Tensor, qmax: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """``scale`` as ``[N, G]`` in the weight's dtype after checking every argument."""
    if weight.ndim != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"weight must be a 2-D float32, float16 or bfloat16 tensor [N, K], got shape "
            f"{tuple(weight.shape)!r} and dtype {weight.dtype}; flatten a Conv weight with "
            f"weight.flatten(1)"
        )
    n, k = weight.shape
    if k % GROUP_SIZE:
        raise ValueError(
            f"2:4 sparsity needs the reduction size to be a multiple of {GROUP_SIZE}, got {k} for "
            f"weight shape {(n, k)!r}"
        )
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 0 < qmax <= MAX_QMAX:
        raise ValueError(
            f"qmax must be an int in 1..{MAX_QMAX} (127 for int8, 7 for int4), got {qmax!r}"
        )
    if not scale.dtype.is_floating_point or scale.ndim not in (1, 2) or scale.shape[0] != n:
        raise ValueError(
            f"scale must be a float tensor [N] (per channel) or [N, G] (per group) with N = {n}, "
            f"got dtype {scale.dtype} and shape {tuple(scale.shape)!r}"
        )
    scale = scale.reshape(n, -1)
    if k % scale.shape[1]:
        raise ValueError(
            f"{scale.shape[1]} scales per row do not split the reduction size {k} into equal "
            f"groups; pass [N] or [N, K / group_size] scales"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != weight.shape):
        raise ValueError(
            f"mask must be a bool tensor of the weight's shape {(n, k)!r}, got dtype {mask.dtype} "
            f"and shape {tuple(mask.shape)!r}"
        )
    return scale.to(weight.dtype)


def _launch(
    weight: torch.Tensor, scale: torch.Tensor, qmax: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on checked arguments (``scale`` as ``[N, G]``)."""
    tensors = (weight, scale) if mask is None else (weight, scale, mask)
    _require_kernel(*tensors)
    weight, scale = weight.contiguous(), scale.contiguous()
    n, k = weight.shape
    out = torch.empty_like(weight)
    if mask is None:
        mask_out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        mask_in = mask_out.view(torch.uint8)  # unused by the kernel
    else:
        mask_out = mask
        mask_in = mask.contiguous().view(torch.uint8)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
    _fake_quant_2_4_kernel[grid](
        weight,
        scale,
        mask_in,
        out,
        mask_out.view(torch.uint8),
        n,
        k,
        scale.shape[1],
        k // scale.shape[1],
        QMAX=qmax,
        HAS_MASK=mask is not None,
        BFLOAT16=weight.dtype == torch.bfloat16,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out, mask_out


def fake_quant_2_4(
    weight: torch.Tensor, scale: torch.Tensor, qmax: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 mask and symmetric fake quantization of ``weight`` in one Triton kernel.

    Bit-identical to :func:`fake_quant_2_4_reference` (same mask, same output bits). No gradient:
    training goes through :func:`fake_quant_2_4_ste`.

    Args:
        weight: float32, float16 or bfloat16 CUDA tensor ``[N, K]``, ``K`` a multiple of 4.
        scale: positive steps, ``[N]`` per output channel or ``[N, G]`` per group of ``K / G``
            (``WeightFakeQuant.scale()``); used in the weight's dtype. Not checked for
            positivity, which would cost a device synchronization.
        qmax: the grid is ``[-qmax, qmax]``: 127 for ``int8_sym_per_channel``, 7 for INT4.
        mask: optional bool mask ``[N, K]`` to apply instead of computing the 2:4 mask (a mask
            kept from an earlier step); returned as is.

    Returns:
        ``(wq, mask)``: the fake-quantized weight (``weight``'s dtype, pruned entries +0.0) and
        the bool mask keeping 2 of every 4 along ``K``.

    Raises:
        ValueError: a shape, dtype or ``qmax`` is wrong.
        RuntimeError: Triton is not importable or a tensor is not on a CUDA GPU.

    Example:
        >>> w = torch.randn(64, 256, device="cuda")
        >>> wq, mask = fake_quant_2_4(w, w.abs().amax(1) / 127, 127)  # doctest: +SKIP
    """
    scale = _checked(weight, scale, qmax, mask)
    return _launch(weight, scale, qmax, mask)


def fake_quant_2_4_reference(
    weight: torch.Tensor, scale: torch.Tensor, qmax: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`fake_quant_2_4` computes, in plain PyTorch on any device.

    The mask is :func:`~deploycomp.kernels.sparsity.mask_2_4`; the quantization is the forward of
    ``lsq_fake_quantize`` (``compress/fake_quant.py``) with the given steps: division, clamp to
    ``[-qmax, qmax]``, straight-through round (half to even; its forward value writes a zero as
    +0.0), multiplication by the step.

    Example:
        >>> wq, mask = fake_quant_2_4_reference(torch.tensor([[0.26, -2.0, 0.1, 0.0]]),
        ...                                     torch.tensor([0.1]), 7)
        >>> wq, mask
        (tensor([[ 0.3000, -0.7000,  0.0000,  0.0000]]), tensor([[ True,  True, False, False]]))
    """
    scale = _checked(weight, scale, qmax, mask)
    if mask is None:
        mask = mask_2_4(weight)
    n, groups = scale.shape
    kept = torch.where(mask, weight, weight.new_zeros(())).reshape(n, groups, -1)
    clamped = torch.clamp(kept / scale.unsqueeze(-1), -qmax, qmax)
    rounded = (clamped.round() - clamped) + clamped
    return (rounded * scale.unsqueeze(-1)).reshape(weight.shape), mask


class FakeQuant24STE(torch.autograd.Function):
    """:func:`fake_quant_2_4` with the gradients of ``weight_quant(sr_ste(weight, mask))``.

    Backward recomputes the quotient from the saved weight, mask and step and applies, op for op,
    the formulas autograd uses through ``SRSTEMask`` and ``lsq_fake_quantize`` (mul, the
    straight-through add, clamp, div and their broadcast sums), so the gradients are the same
    bits as on the unfused path. Call it through :func:`fake_quant_2_4_ste`.
    """

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        positive_step: torch.Tensor,
        mask: torch.Tensor | None,
        qmax: int,
        decay: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = weight.shape[0]
        step = positive_step.reshape(n, -1)
        wq, mask = _launch(weight, step, qmax, mask)
        ctx.save_for_backward(weight, positive_step, mask)
        ctx.qmax, ctx.decay = qmax, decay
        ctx.mark_non_differentiable(mask)
        return wq, mask

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_wq: torch.Tensor, _grad_mask: None) -> tuple:
        weight, positive_step, mask = ctx.saved_tensors
        qmax = ctx.qmax
        n = weight.shape[0]
        step = positive_step.reshape(n, -1, 1)
        grad = grad_wq.reshape(n, step.shape[1], -1)
        kept = torch.where(mask, weight, weight.new_zeros(())).reshape(grad.shape)
        quotient = kept / step
        clamped = torch.clamp(quotient, -qmax, qmax)
        rounded = (clamped.round() - clamped) + clamped
        # out = rounded * step; rounded = detached + clamped; clamped = clamp(kept / step)
        grad_clamped = grad * step
        inside = (quotient >= -qmax).logical_and_(quotient <= qmax)
        grad_quotient = torch.where(inside, grad_clamped, grad.new_zeros(()))
        grad_weight = grad_step = None
        if ctx.needs_input_grad[0]:
            grad_kept = (grad_quotient / step).reshape(weight.shape)
            pruned = torch.where(mask, weight.new_zeros(()), weight)
            grad_weight = grad_kept + ctx.decay * pruned  # SRSTEMask.backward
        if ctx.needs_input_grad[1]:
            from_mul = (grad * rounded).sum(2, keepdim=True)
            from_div = (-grad_quotient * ((kept / step) / step)).sum(2, keepdim=True)
            grad_step = (from_mul + from_div).reshape(positive_step.shape)
        return grad_weight, grad_step, None, None, None


def fake_quant_2_4_ste(
    weight: torch.Tensor,
    positive_step: torch.Tensor,
    qmax: int,
    mask: torch.Tensor | None = None,
    sr_ste_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused mask + fake quantization for training: forward of :func:`fake_quant_2_4`, backward of
    ``lsq_fake_quantize(sr_ste(weight, mask, sr_ste_decay), positive_step, ...)``.

    Args:
        weight: the trainable weight ``[N, K]`` (CUDA).
        positive_step: the step as ``lsq_fake_quantize`` uses it, already made positive and
            gradient-scaled (``[N]``, ``[N, G]`` or ``[N, G, 1]``, the weight's dtype); its
            gradient is LSQ's.
        qmax: the grid is ``[-qmax, qmax]``.
        mask: the bool mask to train under; ``None`` computes the 2:4 mask of ``weight`` in the
            kernel.
        sr_ste_decay: SR-STE decay added to the gradient of pruned weights (0: plain STE).

    Returns:
        ``(wq, mask)``; only ``wq`` carries a gradient.

    Raises:
        ValueError: a shape, dtype, ``qmax`` or ``sr_ste_decay`` is wrong.
        RuntimeError: Triton is not importable or a tensor is not on a CUDA GPU.

    Example:
        >>> w = torch.randn(64, 256, device="cuda", requires_grad=True)
        >>> step = (w.detach().abs().amax(1) / 127).requires_grad_()
        >>> wq, mask = fake_quant_2_4_ste(w, step, 127, sr_ste_decay=2e-4)  # doctest: +SKIP
        >>> wq.sum().backward()  # doctest: +SKIP
    """
    _checked(weight, positive_step.reshape(weight.shape[0], -1), qmax, mask)
    if positive_step.dtype != weight.dtype:
        raise ValueError(
            f"positive_step must have the weight's dtype {weight.dtype}, got "
            f"{positive_step.dtype}; WeightFakeQuant keeps its step in the weight's dtype"
        )
    if not sr_ste_decay >= 0:  # also rejects NaN
        raise ValueError(f"sr_ste_decay must be >= 0, got {sr_ste_decay!r}")
    return FakeQuant24STE.apply(weight, positive_step, mask, qmax, float(sr_ste_decay))

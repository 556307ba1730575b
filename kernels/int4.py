"""INT4 weight-only quantization: reference numerics in plain PyTorch.

Takes a Linear weight ``[out, in]`` and quantizes it symmetrically (zero point 0) in groups of
``group_size`` consecutive elements along the reduction axis ``in``, one float32 scale per group:
the ``int4_sym_group{g}`` scheme. Returns int8 tensors holding values in [-8, 7] with their scales,
the dequantized weight, and the packed storage (two values per byte) that ONNX INT4 initializers,
blocked DequantizeLinear (opset 21) and the backends' weight-only GEMMs consume. A Conv weight is
quantized through its ``weight.flatten(1)`` view. Everything here is deterministic and runs on the
CPU; fast paths elsewhere are checked against it.

The grid is symmetric, ``scale = max|w| / 7`` per group, so quantized values lie in [-7, 7] and -8
is never produced: using it would need ``scale = max|w| / 8``, which clips whichever extreme is
positive to ``7 * scale`` and makes ``q(-w) != -q(w)``. One code of 16 is the price of zero error
at both ends of every group. Unpacking still reads -8, since other producers may write it.
"""

from __future__ import annotations

import torch

from deploycomp.kernels.quantize import TINY_SCALE

INT4_MIN = -8
INT4_MAX = 7
INT4_WEIGHT_QMAX = 7


def _check_grouping(shape: torch.Size, group_size: int) -> int:
    """Number of groups per row of a ``[out, in]`` tensor; raises if ``in`` does not split."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int (32, 64 or 128), got {group_size!r}")
    if len(shape) != 2:
        raise ValueError(
            f"INT4 group-wise quantization takes a 2-D weight [out, in], got shape {tuple(shape)!r};"
            f" flatten a Conv weight with weight.flatten(1) first"
        )
    if shape[1] % group_size:
        raise ValueError(
            f"the reduction size {shape[1]} of weight shape {tuple(shape)!r} is not a multiple of "
            f"group_size {group_size}; pick a group size that divides it or leave the layer at INT8"
        )
    return shape[1] // group_size


def _checked_scales(
    scales: torch.Tensor, expected: tuple[int, int], group_size: int
) -> torch.Tensor:
    """``scales`` as float32 after checking their shape and that every one is positive."""
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales shape {tuple(scales.shape)!r} does not match the weight's groups of "
            f"{group_size}; expected {expected!r} ([out, in / group_size])"
        )
    if not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be a floating-point tensor, got dtype {scales.dtype}")
    scales = scales.detach().float()
    if scales.numel() and not bool(torch.all(torch.isfinite(scales) & (scales > 0))):
        raise ValueError(
            f"scales must be positive and finite, found values from {scales.min().item():.4g} to "
            f"{scales.max().item():.4g}; pass the absolute, floored steps (WeightFakeQuant.scale())"
        )
    return scales


def _check_integer(q: torch.Tensor, name: str) -> None:
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {q.dtype}")


def quantize_int4_groupwise(
    weight: torch.Tensor, group_size: int, scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 quantization with one scale per group of ``group_size`` along ``in``.

    Rounding is half to even, as in ONNX QuantizeLinear, so the reference and the exported model
    agree on every tie. Each element's error is at most half its group's scale when the scales
    are computed here; given ``scales`` (steps learned by joint compression) are used as they are,
    and values beyond ``7 * scale`` clip, exactly as the fake quantizer that learned them does, so
    a weight already on that grid comes back as its own integer codes.

    Args:
        weight: floating-point weight ``[out, in]``.
        group_size: elements per group along ``in``; 32, 64 or 128 in the plans, any divisor of
            ``in`` accepted.
        scales: optional positive float scales ``[out, in / group_size]`` to quantize with instead
            of ``max|w| / 7`` per group.

    Returns:
        ``(q, scales)``: ``q`` int8 ``[out, in]`` with values in [-7, 7] (inside the INT4 range
        [-8, 7]), ``scales`` float32 ``[out, in / group_size]``. An all-zero group gets a tiny
        positive scale, not 0, so dequantization never divides by or multiplies into nonsense.

    Raises:
        ValueError: the weight is not 2-D, ``in`` is not a multiple of ``group_size``, or
            ``scales`` has the wrong shape or a value that is not positive and finite.

    Example:
        >>> q, scales = quantize_int4_groupwise(torch.tensor([[0.7, -0.35, 0.1, 0.0]]), 2)
        >>> q, scales
        (tensor([[ 7, -4,  7,  0]], dtype=torch.int8), tensor([[0.1000, 0.0143]]))
    """
    n_groups = _check_grouping(weight.shape, group_size)
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    # float32 whatever the input: scales of a half-precision weight keep their precision.
    groups = weight.detach().float().reshape(weight.shape[0], n_groups, group_size)
    if scales is None:
        amax = groups.abs().amax(dim=-1)
        scales = torch.clamp(amax / INT4_WEIGHT_QMAX, min=TINY_SCALE)
    else:
        scales = _checked_scales(scales, (weight.shape[0], n_groups), group_size)
    q = torch.round(groups / scales.unsqueeze(-1)).clamp(-INT4_WEIGHT_QMAX, INT4_WEIGHT_QMAX)
    return q.to(torch.int8).reshape(weight.shape), scales


def dequantize_int4_groupwise(
    q: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Float32 weight ``q * scale`` from :func:`quantize_int4_groupwise`'s output.

    Args:
        q: integer tensor ``[out, in]`` (values in [-8, 7]).
        scales: ``[out, in / group_size]``.
        group_size: elements per group along ``in``.

    Returns:
        float32 ``[out, in]``.

    Raises:
        ValueError: shapes of ``q`` and ``scales`` disagree with each other or with ``group_size``.

    Example:
        >>> dequantize_int4_groupwise(torch.tensor([[7, -4]], dtype=torch.int8),
        ...                           torch.tensor([[0.1]]), 2)
        tensor([[ 0.7000, -0.4000]])
    """
    _check_integer(q, "q")
    n_groups = _check_grouping(q.shape, group_size)
    if scales.shape != (q.shape[0], n_groups):
        raise ValueError(
            f"scales shape {tuple(scales.shape)!r} does not match q shape {tuple(q.shape)!r} with "
            f"group_size {group_size}; expected {(q.shape[0], n_groups)!r}"
        )
    groups = q.reshape(q.shape[0], n_groups, group_size).float()
    return (groups * scales.float().unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack INT4 values two per byte along the last axis, in the ONNX INT4 layout.

    Element ``2i`` goes to the low nibble of byte ``i`` and element ``2i + 1`` to the high nibble,
    each as a 4-bit two's complement number. The last axis must have an even length: ONNX packs
    the flattened tensor, so packing row by row gives the same bytes only when no row ends in the
    middle of a byte. Padding each row instead would silently write a layout no reader expects,
    hence an error (an ``in`` split into groups of 32, 64 or 128 is always even).

    Args:
        q: integer tensor ``[..., n]`` with values in [-8, 7], ``n`` even.

    Returns:
        uint8 tensor ``[..., n / 2]``.

    Raises:
        ValueError: ``q`` is not an integer tensor, a value lies outside [-8, 7], or ``n`` is odd.

    Example:
        >>> pack_int4(torch.tensor([1, -1, -8, 7], dtype=torch.int8))  # 0xF1, 0x78
        tensor([241, 120], dtype=torch.uint8)
    """
    _check_integer(q, "q")
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ValueError(
            f"packing INT4 needs an even length along the last axis, got shape {tuple(q.shape)!r};"
            f" pad the reduction axis to an even size before quantizing"
        )
    if q.numel() and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise ValueError(
            f"INT4 values must lie in [{INT4_MIN}, {INT4_MAX}], found "
            f"{q.min().item()} to {q.max().item()}"
        )
    nibbles = q.to(torch.int16) & 0xF  # two's complement in 4 bits: -1 -> 0xF, -8 -> 0x8
    low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel_last: int) -> torch.Tensor:
    """Int8 values from the bytes written by :func:`pack_int4`.

    Args:
        packed: uint8 tensor ``[..., n / 2]``.
        numel_last: ``n``, the unpacked length of the last axis; must be ``2 * packed.shape[-1]``
            since :func:`pack_int4` never pads. It is asked for so a caller's wrong shape is caught
            here instead of surfacing as a reshape error later.

    Returns:
        int8 tensor ``[..., n]`` with values in [-8, 7].

    Raises:
        ValueError: ``packed`` is not uint8 or ``numel_last`` does not match it.

    Example:
        >>> unpack_int4(torch.tensor([0xF1, 0x78], dtype=torch.uint8), 4)
        tensor([ 1, -1, -8,  7], dtype=torch.int8)
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    if packed.ndim == 0 or numel_last != 2 * packed.shape[-1]:
        raise ValueError(
            f"numel_last {numel_last!r} does not match packed shape {tuple(packed.shape)!r}; "
            f"expected twice its last dimension"
        )
    wide = packed.to(torch.int16)
    nibbles = torch.stack([wide & 0xF, wide >> 4], dim=-1)
    signed = (nibbles ^ 0x8) - 0x8  # sign-extend bit 3
    return signed.reshape(*packed.shape[:-1], numel_last).to(torch.int8)

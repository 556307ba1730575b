"""INT4 weight-only GEMM in Triton: ``y = x @ dequantize(packed, scales).T`` without a dense weight.

Takes an activation ``x [M, K]`` (fp16 or bf16, CUDA) and an ``int4_sym_group{g}`` weight as the
backends store it: the bytes of :func:`~deploycomp.kernels.int4.pack_int4` ``[N, K / 2]`` (row
``n`` is output channel ``n``, element ``2i`` in the low nibble of byte ``i``) and one scale per
group of ``g`` along ``K``, ``[N, K / g]``. Returns ``y [M, N]`` in ``x``'s dtype, accumulated in
fp32. Each program streams its weight tile as packed bytes, unpacks and sign-extends the nibbles,
multiplies by the group scale in registers and feeds ``tl.dot``; block sizes are autotuned per
bucket of ``M`` (decode-like 1..16 rows, up to 256, beyond). :func:`int4_matmul_reference` is the
same product in plain fp32 PyTorch (:func:`~deploycomp.kernels.int4.unpack_int4` and
:func:`~deploycomp.kernels.int4.dequantize_int4_groupwise`), and :func:`prepare_int4_weight`
turns a float weight into ``(packed, scales)``.

Triton is optional: this module imports without it, and :func:`int4_matmul` raises a clear error
when Triton is missing or a tensor is not on a CUDA GPU (with ``TRITON_INTERPRET=1`` set before
this module is imported, it runs on CPU tensors in Triton's interpreter, with one fixed block
configuration instead of autotuning).
"""

from __future__ import annotations

import torch

from deploycomp.kernels.int4 import (
    dequantize_int4_groupwise,
    pack_int4,
    quantize_int4_groupwise,
    unpack_int4,
)

try:  # optional: ships with PyTorch's CUDA builds; everything else here needs only torch
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - depends on the installation
    triton = tl = None
    _TRITON_IMPORT_ERROR: ImportError | None = err
else:
    _TRITON_IMPORT_ERROR = None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Upper bounds of the M buckets, each with its own block configurations (the autotuning key).
SMALL_M = 16
MEDIUM_M = 256
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _m_bucket(m: int) -> int:
    return 0 if m <= SMALL_M else 1 if m <= MEDIUM_M else 2


if triton is not None:

    def _config(block_m, block_n, block_k, warps, stages):
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
        return triton.Config(blocks, num_warps=warps, num_stages=stages)

    # Kernels here call Triton builtins only, never the library's own @jit helpers (tl.cdiv,
    # tl.zeros, tl.sum): those are compiled or interpreted according to how triton itself was first
    # imported, which would tie the interpreter to processes that set TRITON_INTERPRET beforehand.

    # Per M bucket: decode-like rows stream the weight (wide K tiles, narrow N tiles so that
    # enough programs run); large M is compute-bound (large square-ish tiles).
    _CONFIGS = {
        0: [
            _config(16, 32, 128, 4, 4),
            _config(16, 64, 128, 4, 4),
            _config(16, 64, 256, 4, 3),
            _config(16, 128, 128, 4, 3),
        ],
        1: [
            _config(32, 64, 128, 4, 4),
            _config(64, 64, 64, 4, 4),
            _config(64, 128, 64, 4, 4),
            _config(128, 64, 64, 4, 4),
        ],
        2: [
            _config(128, 128, 64, 8, 3),
            _config(128, 256, 64, 8, 3),
            _config(256, 128, 64, 8, 3),
            _config(128, 128, 128, 8, 3),
        ],
    }

    def _configs_for_bucket(configs, named_args, **kwargs):
        return [c for c in configs if c in _CONFIGS[named_args["M_BUCKET"]]]

    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _int4_matmul_kernel(
        x_ptr,
        packed_ptr,
        scales_ptr,
        y_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_xm,
        stride_xk,
        stride_ym,
        stride_yn,
        GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        # Programs walk GROUP_M row tiles per column tile, so neighbours share weight tiles in L2.
        pid = tl.program_id(0)
        tiles_m = (M + BLOCK_M - 1) // BLOCK_M
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        # Rows past M or N wrap around instead of being masked: loads stay in bounds, stores are
        # masked.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        offs_byte = tl.arange(0, BLOCK_K // 2)
        half_k = K // 2
        scales_per_row = K // GROUP_SIZE
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = packed_ptr + offs_n[:, None].to(tl.int64) * half_k + offs_byte[None, :]
        s_rows = scales_ptr + offs_n.to(tl.int64) * scales_per_row

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                packed = tl.load(w_ptrs).to(tl.int32)
            else:
                x = tl.load(x_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                byte_valid = (k0 // 2 + offs_byte)[None, :] < half_k
                packed = tl.load(w_ptrs, mask=byte_valid, other=0).to(tl.int32)
            # Two's complement nibbles: (v ^ 8) - 8 sign-extends bit 3; low nibble first.
            low = ((packed & 0xF) ^ 8) - 8
            high = (((packed >> 4) & 0xF) ^ 8) - 8
            q = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)).to(tl.float32)
            if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale per row
                scale = tl.load(s_rows + k0 // GROUP_SIZE).to(tl.float32)
                w = q * scale[:, None]
            elif BLOCK_K % GROUP_SIZE == 0:  # whole groups: one scale per row and group
                groups = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
                groups = tl.minimum(groups, scales_per_row - 1)  # the tail past K
                scale = tl.load(s_rows[:, None] + groups[None, :]).to(tl.float32)
                q = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE))
                w = tl.reshape(q * scale[:, :, None], (BLOCK_N, BLOCK_K))
            else:  # groups straddle tiles: one scale per element
                groups = tl.minimum(k0 + offs_k, K - 1) // GROUP_SIZE
                w = q * tl.load(s_rows[:, None] + groups[None, :]).to(tl.float32)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K // 2

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
        y_mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    _int4_matmul_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(
        _int4_matmul_kernel
    )
    _int4_matmul_autotuned = triton.autotune(
        configs=[c for bucket in sorted(_CONFIGS) for c in _CONFIGS[bucket]],
        key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
        prune_configs_by={"early_config_prune": _configs_for_bucket},
    )(_int4_matmul_even_k)


def _kernels_interpreted() -> bool:
    return triton is not None and type(_int4_matmul_kernel).__name__ == "InterpretedFunction"


def _check(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[int, int, int]:
    """``(M, N, K)`` after checking every argument of :func:`int4_matmul`."""
    if x.ndim != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            f"x must be a 2-D float16 or bfloat16 tensor [M, K], got shape {tuple(x.shape)!r} and "
            f"dtype {x.dtype}; reshape a batch to [-1, K] and cast it"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int (32, 64 or 128), got {group_size!r}")
    m, k = x.shape
    if k % group_size or k % 2:
        raise ValueError(
            f"the reduction size {k} of x is not an even multiple of group_size {group_size}"
        )
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != k // 2:
        raise ValueError(
            f"packed must be a uint8 tensor [N, K / 2] = [N, {k // 2}] (pack_int4 of the [N, K] "
            f"weight), got dtype {packed.dtype} and shape {tuple(packed.shape)!r}"
        )
    n = packed.shape[0]
    if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (n, k // group_size):
        raise ValueError(
            f"scales must be a float tensor [N, K / group_size] = {(n, k // group_size)!r}, got "
            f"dtype {scales.dtype} and shape {tuple(scales.shape)!r}"
        )
    return m, n, k


def _require_kernel(*tensors: torch.Tensor) -> None:
    """Raise unless the Triton kernel can run on ``tensors``."""
    if triton is None:
        raise RuntimeError(
            f"int4_matmul needs Triton, which is not importable here ({_TRITON_IMPORT_ERROR!r}); "
            f"install a CUDA build of PyTorch (it ships Triton) or call int4_matmul_reference"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1 or (not _kernels_interpreted() and not tensors[0].is_cuda):
        raise RuntimeError(
            f"int4_matmul runs on CUDA tensors on one device, got tensors on "
            f"{sorted(str(d) for d in devices)}; move them to the GPU or call int4_matmul_reference"
        )


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for an INT4 group-wise weight ``W``, dequantized tile by tile in registers.

    Args:
        x: activations ``[M, K]``, float16 or bfloat16, on a CUDA GPU (any strides).
        packed: uint8 ``[N, K / 2]``, :func:`~deploycomp.kernels.int4.pack_int4` of the
            ``[N, K]`` integer weight.
        scales: ``[N, K / group_size]``, float16, bfloat16 or float32.
        group_size: elements per scale along ``K``; ``K`` must be a multiple of it.
        out: optional ``[M, N]`` tensor of ``x``'s dtype and device to write into (any strides),
            for callers that keep their buffers, such as a captured CUDA graph.

    Returns:
        ``y [M, N]`` (``out`` when given) in ``x``'s dtype (fp32 accumulation; each dequantized weight is rounded to
        ``x``'s dtype before the tensor-core product).

    Raises:
        ValueError: a shape, dtype or ``group_size`` is wrong.
        RuntimeError: Triton is not importable or a tensor is not on a CUDA GPU.

    Example:
        >>> packed, scales = prepare_int4_weight(torch.randn(256, 512, device="cuda"), 128)
        >>> int4_matmul(torch.randn(4, 512, device="cuda").half(), packed, scales, 128).shape
        ... # doctest: +SKIP
        torch.Size([4, 256])
    """
    m, n, k = _check(x, packed, scales, group_size)
    _require_kernel(x, packed, scales)
    if out is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be a {x.dtype} tensor of shape {(m, n)!r} on {x.device}, got "
            f"{out.dtype}, {tuple(out.shape)!r} on {out.device}"
        )
    else:
        y = out
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    packed, scales = packed.contiguous(), scales.contiguous()
    args = (x, packed, scales, y, m, n, k, _m_bucket(m), *x.stride(), *y.stride())
    if _kernels_interpreted():
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
        _int4_matmul_even_k[grid](*args, GROUP_SIZE=group_size, **blocks)
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _int4_matmul_autotuned[grid](*args, GROUP_SIZE=group_size)
    return y


def int4_matmul_reference(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """What :func:`int4_matmul` computes, in float32 PyTorch on any device: unpack, dequantize,
    multiply. Returns float32 ``[M, N]``.

    Example:
        >>> packed, scales = prepare_int4_weight(torch.tensor([[0.7, -0.35, 0.1, 0.0]]), 2)
        >>> int4_matmul_reference(torch.ones(1, 4, dtype=torch.float16), packed, scales, 2)
        tensor([[0.4500]])
    """
    _, _, k = _check(x, packed, scales, group_size)
    weight = dequantize_int4_groupwise(unpack_int4(packed, k), scales, group_size)
    return x.float() @ weight.T


def prepare_int4_weight(
    weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales)`` for :func:`int4_matmul` from a float weight ``[N, K]``.

    Quantizes with :func:`~deploycomp.kernels.int4.quantize_int4_groupwise` (``max|w| / 7`` per
    group, half-to-even rounding) and packs with :func:`~deploycomp.kernels.int4.pack_int4`, on
    the weight's device.

    Args:
        weight: floating-point weight ``[N, K]``, ``K`` a multiple of ``group_size``.
        group_size: elements per scale along ``K``.
        scale_dtype: dtype of the returned scales (float32, or the activations' dtype).

    Returns:
        ``(packed, scales)``: uint8 ``[N, K / 2]`` and ``[N, K / group_size]`` in ``scale_dtype``.

    Example:
        >>> packed, scales = prepare_int4_weight(torch.tensor([[0.7, -0.35, 0.1, 0.0]]), 2)
        >>> packed, scales
        (tensor([[199,   7]], dtype=torch.uint8), tensor([[0.1000, 0.0143]]))
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    q, scales = quantize_int4_groupwise(weight, group_size)
    return pack_int4(q), scales.to(scale_dtype)

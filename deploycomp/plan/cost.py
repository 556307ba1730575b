"""Cost model: the predicted latency and the stored size of one layer under one compression option.

Takes a hardware profile, a backend, an inventory :class:`~deploycomp.plan.inventory.Layer` and an
:class:`~deploycomp.plan.options.Option`; returns milliseconds with their source and stored weight
bytes. A timing from the profile's ``[measured]`` table wins where one exists for the layer's
backend, op kind, shape key and schemes; otherwise a roofline predicts it: the larger of compute
time (MACs at the peak of the option's compute precision, 2:4-sparse where the device has sparse
units) and memory time (weights at their stored size, the input at its precision, the fp32 output,
at the device's bandwidth), plus a fixed per-layer overhead. Every planner uses this one model.
"""

from __future__ import annotations

import dataclasses
import math
import re

from deploycomp.hw.profile import FLOAT_SCHEMES, HardwareProfile, MeasuredEntry, OpCapability
from deploycomp.plan.inventory import Layer
from deploycomp.plan.options import FP32, SPARSE_2_4, Option

# Time a layer costs beyond its roofline: on a CPU, ONNX Runtime's or OpenVINO's per-node
# dispatch and the thread pool's fork/join (a few microseconds); on a GPU, a kernel's launch and
# tail, back to back inside an engine. Estimates, not measurements: [measured] entries replace
# the whole prediction.
CPU_LAYER_OVERHEAD_MS = 0.002
GPU_LAYER_OVERHEAD_MS = 0.003
SCALE_BYTES = 4  # one fp32 scale per channel (per-channel schemes) or per group (group schemes)
# 2:4 metadata: a 2-bit position for each kept value, i.e. one bit per dense weight.
SPARSE_METADATA_BITS_PER_WEIGHT = 1
_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "uint8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The parts of one roofline prediction, in milliseconds."""

    compute_ms: float
    memory_ms: float
    overhead_ms: float

    @property
    def total_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.overhead_ms

    @property
    def memory_bound(self) -> bool:
        return self.memory_ms > self.compute_ms


def compute_precision(option: Option) -> str:
    """The precision the option's arithmetic runs in: its activation's (``int8`` for W8A8,
    ``fp32`` for fp32 and every weight-only scheme, which dequantizes into the float GEMM)."""
    if option.activation in FLOAT_SCHEMES:
        return option.activation
    return "int8"


def sparse_units(hw: HardwareProfile, option: Option) -> bool:
    """Whether a 2:4 option runs on sparse units: the device lists a sparse peak for its compute
    precision (NVIDIA tensor cores from sm_80 on; no CPU). Elsewhere it is stored and run dense."""
    peak = hw.peak_tops.get(compute_precision(option))
    return option.sparsity == SPARSE_2_4 and peak is not None and peak.sparse_tops is not None


def _scale_count(layer: Layer, scheme: str) -> int:
    numel = math.prod(layer.weight_shape)
    rows = numel // layer.reduction_size if layer.reduction_size else 0
    if scheme.endswith("per_tensor"):
        return 1
    group = re.search(r"group(\d+)$", scheme)
    if group:
        return rows * math.ceil(layer.reduction_size / int(group.group(1)))
    return rows  # per channel: output channels, or table rows for an embedding


def option_bytes(layer: Layer, option: Option, hw: HardwareProfile) -> int:
    """Stored weight bytes of ``layer`` under ``option``, scales and 2:4 metadata included.

    fp32 is 4 B a weight; INT8 1 B plus a 4 B scale per channel; INT4 half a byte plus a 4 B
    scale per group. 2:4 halves the stored values and adds a 2-bit position per kept value only
    where the device has sparse units (GPU engines); an ONNX file run on a CPU stores the pruned
    zeros densely, so there 2:4 saves nothing.

    Args:
        layer: an inventory layer.
        option: the compression option.
        hw: the target, which decides whether 2:4 is stored compressed.

    Returns:
        Bytes (0 for a layer without a constant weight).

    Example:
        >>> option_bytes(layer, Option("int8_sym_per_channel", "int8_sym_per_tensor"), hw)
        148992  # a 384x384 linear: 147456 B of weights + 384 scales
    """
    numel = math.prod(layer.weight_shape) if layer.weight_shape else 0
    if numel == 0:
        return 0
    bits = _BITS[option.weight.split("_")[0]]
    scales = (
        0 if option.weight in FLOAT_SCHEMES else SCALE_BYTES * _scale_count(layer, option.weight)
    )
    if sparse_units(hw, option):
        stored_bits = numel // 2 * bits + numel * SPARSE_METADATA_BITS_PER_WEIGHT
    else:
        stored_bits = numel * bits
    return math.ceil(stored_bits / 8) + scales


def _capability(hw: HardwareProfile, backend: str, layer: Layer) -> OpCapability | None:
    return hw.capabilities.get(backend, {}).get(layer.kind)


def roofline(hw: HardwareProfile, backend: str, layer: Layer, option: Option) -> Roofline:
    """The roofline prediction of ``layer`` under ``option`` with ``backend`` on ``hw``.

    Compute: ``2 * macs`` at the peak of the option's compute precision (sparse where
    :func:`sparse_units`). Memory, at ``hw.memory_bandwidth_gbs``: the stored weights (for an
    embedding, only the gathered rows), the input at 1 B a value when quantized (its
    QuantizeLinear fused into the producer) else 4 B, and the fp32 output. Where the backend does
    not fuse weight-only dequantization (``weight_only_fused = false``), the option costs the fp32
    op plus a pass that reads the stored weights and writes them as fp32, and one more node.

    Args:
        hw: the target.
        backend: the backend the layer runs on (decides fused dequantization).
        layer: an inventory layer.
        option: the compression option.

    Returns:
        Compute, memory and overhead times.

    Raises:
        ProfileError: the profile has no peak for the option's compute precision.

    Example:
        >>> roofline(hw, "onnxruntime", layer, Option()).memory_bound
        True
    """
    overhead_ms = GPU_LAYER_OVERHEAD_MS if hw.kind == "gpu" else CPU_LAYER_OVERHEAD_MS
    bytes_per_ms = hw.memory_bandwidth_gbs * 1e6
    cap = _capability(hw, backend, layer)
    weight_only = option.weight not in FLOAT_SCHEMES and option.activation in FLOAT_SCHEMES
    if weight_only and cap is not None and not cap.weight_only_fused:
        base = roofline(hw, backend, layer, dataclasses.replace(option, weight=FP32))
        numel = math.prod(layer.weight_shape)
        expand_ms = (option_bytes(layer, option, hw) + 4 * numel) / bytes_per_ms
        return Roofline(base.compute_ms, base.memory_ms + expand_ms, base.overhead_ms + overhead_ms)
    peak = hw.peak_ops_per_s(compute_precision(option), sparse=sparse_units(hw, option))
    compute_ms = 1e3 * 2 * layer.macs / peak
    weight_bytes = option_bytes(layer, option, hw)
    if layer.kind == "embedding":  # a lookup reads the rows it gathers, not the table
        weight_bytes = weight_bytes * layer.rows / max(layer.in_channels, 1)
    output_bytes = 4 * math.prod(layer.output_shape) if layer.output_shape else 0
    input_bytes = layer.activation_bytes_fp32 - output_bytes
    if option.activation not in FLOAT_SCHEMES:
        input_bytes = input_bytes * _BITS[option.activation.split("_")[0]] // 32
    memory_ms = (weight_bytes + input_bytes + output_bytes) / bytes_per_ms
    return Roofline(compute_ms, memory_ms, overhead_ms)


def _float_alias(scheme: str) -> str:
    """Float schemes match each other: a plan's ``fp32`` layer runs in the backend's float
    precision (fp16 on a GPU engine), which is what a GPU profile's float entries time."""
    return "float" if scheme in FLOAT_SCHEMES else scheme


def measured_entry(
    hw: HardwareProfile, backend: str, layer: Layer, option: Option
) -> MeasuredEntry | None:
    """The profile's timing of this layer shape under this option, if a tool wrote one.

    Entries match on backend, op kind, ``layer.shape_key`` and the three schemes; among several,
    the latest date wins (then the latest backend version), so a rerun replaces an old number.
    """
    key = layer.shape_key
    wanted = (_float_alias(option.weight), _float_alias(option.activation), option.sparsity)
    matches = [
        e
        for e in hw.measured
        if (e.backend, e.op_kind, e.shape) == (backend, layer.kind, key)
        and (_float_alias(e.weight_scheme), _float_alias(e.activation_scheme), e.sparsity) == wanted
    ]
    return max(matches, key=lambda e: (e.date, e.backend_version)) if matches else None


def option_ms(hw: HardwareProfile, backend: str, layer: Layer, option: Option) -> tuple[float, str]:
    """Predicted latency of ``layer`` under ``option`` with ``backend`` on ``hw``, and its source.

    Args:
        hw: the target.
        backend: the backend the plan is for.
        layer: an inventory layer.
        option: the compression option.

    Returns:
        (milliseconds, ``"measured"`` when the profile's ``[measured]`` table has an entry for
        this backend, op kind, shape key and schemes, else ``"roofline"``).

    Raises:
        ProfileError: no measured entry and no peak for the option's compute precision.

    Example:
        >>> option_ms(load_profile("intel/xeon-icx"), "onnxruntime", fc, Option())  # fmnist fc1
        (0.00990375, 'roofline')
    """
    entry = measured_entry(hw, backend, layer, option)
    if entry is not None:
        return entry.latency_ms, "measured"
    return roofline(hw, backend, layer, option).total_ms, "roofline"

"""The HardwareProfile: what a device computes fast, per backend, with numbers.

A profile is the planner's view of a target device: identity (vendor, architecture, instruction
set or compute capability), preferred backends in order, peak throughput per precision (dense and
2:4-sparse), memory bandwidth and cache sizes for a roofline cost model, the schemes each backend
accelerates per op kind, and measured timings written by tools. Profiles are built by
``deploycomp.hw.loader`` from the TOML files in ``hw_profiles/``; this module holds the types and
the names every profile may use.
"""

from __future__ import annotations

import dataclasses

from deploycomp.artifacts import Artifact
from deploycomp.errors import ProfileError, closest_match_hint

KINDS = ("cpu", "gpu")
BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")
OP_KINDS = ("linear", "conv2d", "conv2d_depthwise", "conv2d_grouped", "embedding")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
FLOAT_SCHEMES = ("fp32", "fp16", "bf16")
QUANTIZED_WEIGHT_SCHEMES = (
    "int8_sym_per_channel",
    "int8_sym_per_tensor",
    "int4_sym_group32",
    "int4_sym_group64",
    "int4_sym_group128",
    "int4_asym_group128",
)
WEIGHT_SCHEMES = FLOAT_SCHEMES + QUANTIZED_WEIGHT_SCHEMES
ACTIVATION_SCHEMES = FLOAT_SCHEMES + ("int8_sym_per_tensor", "uint8_per_tensor")
SPARSITY_PATTERNS = ("2:4",)
# Flag names as Linux spells them in /proc/cpuinfo.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8",
    "amx_bf16",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PeakThroughput(Artifact):
    """Peak rate of one precision in tera-operations per second (TFLOPS for floats, TOPS for
    integers). ``sparse_tops`` is None where the device has no 2:4 sparse units for it."""

    dense_tops: float
    sparse_tops: float | None = None


@dataclasses.dataclass(frozen=True)
class OpCapability(Artifact):
    """What one backend accelerates for one op kind on this device.

    ``weight_schemes`` pair with any quantized scheme of ``activation_schemes`` (W8A8-style
    kernels) and float weights with float activations; ``weight_only_schemes`` are quantized
    weights computed with float activations (weight-only GEMM). ``sparsity`` lists the patterns
    with sparse kernels; they apply to ``weight_schemes`` only, and pay only from
    ``min_channels_for_2_4`` channels on. ``weight_only_fused`` is False where the backend
    expands a weight-only tensor to float on every run before the op (ONNX Runtime would run a
    DequantizeLinear over a whole embedding table before the Gather, had its lowerer not rewritten
    the pair into one GatherBlockQuantized): such options save storage, not time, and the cost
    model charges the expansion.
    """

    weight_schemes: tuple[str, ...]
    activation_schemes: tuple[str, ...]
    weight_only_schemes: tuple[str, ...] = ()
    sparsity: tuple[str, ...] = ()
    min_channels_for_2_4: int | None = None
    weight_only_fused: bool = True
    note: str = ""


@dataclasses.dataclass(frozen=True)
class MeasuredEntry(Artifact):
    """One timing written into a profile's ``[measured]`` table by a tool, with its provenance."""

    device: str
    backend: str
    backend_version: str
    date: str  # ISO 8601
    op_kind: str
    shape: tuple[int, ...]
    weight_scheme: str
    activation_scheme: str
    sparsity: str
    latency_ms: float


@dataclasses.dataclass(frozen=True)
class HardwareProfile(Artifact):
    """A target device as the planner sees it. Build one with ``load_profile``.

    Cache and core fields that do not apply to a kind are None (``sm_count`` on a CPU, ``cores``
    and ``llc_mib`` on a GPU); ``isa_flags`` is empty and ``compute_capability`` set on GPUs.
    """

    id: str
    name: str
    kind: str
    vendor: str
    architecture: str
    isa_flags: tuple[str, ...]
    compute_capability: tuple[int, int] | None
    backends: tuple[str, ...]
    peak_tops: dict[str, PeakThroughput]
    memory_bandwidth_gbs: float
    memory_capacity_gib: float | None
    l2_cache_mib: float | None
    llc_mib: float | None
    cores: int | None
    sm_count: int | None
    clock_ghz: float | None
    capabilities: dict[str, dict[str, OpCapability]]
    measured: tuple[MeasuredEntry, ...]
    source: str

    def accelerates(
        self,
        backend: str,
        op_kind: str,
        weight_scheme: str,
        activation_scheme: str,
        sparsity: str = "none",
        *,
        channels: int | None = None,
    ) -> bool:
        """Whether ``backend`` has fast kernels for this layer option on this device.

        Float weights with float activations count as accelerated (they are the baseline every
        listed op kind runs in). A backend or op kind the profile does not list is not accelerated.

        Args:
            backend: Backend import name, e.g. ``"tensorrt"``.
            op_kind: One of ``OP_KINDS``.
            weight_scheme: One of ``WEIGHT_SCHEMES``.
            activation_scheme: One of ``ACTIVATION_SCHEMES``.
            sparsity: ``"none"`` or a pattern of ``SPARSITY_PATTERNS``.
            channels: The layer's smallest of input/output channels; when given, 2:4 must also
                clear the backend's ``min_channels_for_2_4``.

        Returns:
            True if the combination runs on accelerated kernels.

        Raises:
            ValueError: A name is not in the vocabulary (a caller bug, not a device limit).

        Example:
            >>> hw.accelerates("tensorrt", "linear", "int8_sym_per_channel",
            ...                "int8_sym_per_tensor", "2:4", channels=1024)
            True
        """
        _check_name("backend", backend, BACKENDS)
        _check_name("op_kind", op_kind, OP_KINDS)
        _check_name("weight_scheme", weight_scheme, WEIGHT_SCHEMES)
        _check_name("activation_scheme", activation_scheme, ACTIVATION_SCHEMES)
        _check_name("sparsity", sparsity, ("none",) + SPARSITY_PATTERNS)
        cap = self.capabilities.get(backend, {}).get(op_kind)
        if cap is None or activation_scheme not in cap.activation_schemes:
            return False
        float_activation = activation_scheme in FLOAT_SCHEMES
        if weight_scheme in FLOAT_SCHEMES:
            paired = float_activation and weight_scheme in cap.weight_schemes
        elif float_activation:
            paired = weight_scheme in cap.weight_only_schemes
        else:
            paired = weight_scheme in cap.weight_schemes
        if not paired or sparsity == "none":
            return paired
        if sparsity not in cap.sparsity or weight_scheme not in cap.weight_schemes:
            return False
        minimum = cap.min_channels_for_2_4
        return channels is None or minimum is None or channels >= minimum

    def peak_ops_per_s(self, precision: str, sparse: bool = False) -> float:
        """Peak operations per second (FLOP/s or integer op/s) of one precision.

        Without 2:4 sparse units for the precision (every CPU), the sparse rate is the dense rate.

        Args:
            precision: One of ``PRECISIONS`` that this profile lists in ``peak_tops``.
            sparse: The 2:4-sparse rate instead of the dense one.

        Returns:
            Operations per second (a multiply-add counts as two).

        Raises:
            ProfileError: The profile has no peak number for ``precision``.

        Example:
            >>> load_profile("nvidia/a100").peak_ops_per_s("int8", sparse=True)
            1.248e+15
        """
        peak = self.peak_tops.get(precision)
        if peak is None:
            listed = ", ".join(self.peak_tops)
            raise ProfileError(
                f"hardware profile {self.id!r} has no peak throughput for precision "
                f"{precision!r}; it lists: {listed}.{closest_match_hint(precision, self.peak_tops)}"
            )
        tops = peak.sparse_tops if sparse and peak.sparse_tops is not None else peak.dense_tops
        return tops * 1e12


def _check_name(what: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(
            f"unknown {what} {value!r}; expected one of: {', '.join(known)}."
            f"{closest_match_hint(value, known)}"
        )

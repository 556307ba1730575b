"""Typed artifacts passed between pipeline stages.

Every artifact is a frozen dataclass that round-trips through JSON (``to_dict``/``from_dict``) and
is saved in the run directory, so any stage can be rerun or resumed from disk. Nested dataclasses,
tuples and optional fields are rebuilt from their type hints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from typing_extensions import Self

from deploycomp._version import __version__
from deploycomp.rundir import file_mode

T = TypeVar("T", bound="Artifact")


def _rebuild(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _rebuild(non_none[0], value) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_rebuild(item, v) for v in value)
    if origin is dict and len(args) == 2:
        return {k: _rebuild(args[1], v) for k, v in value.items()}
    return value


class Artifact:
    """Mixin giving frozen dataclasses JSON round-tripping and atomic saving."""

    schema_version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["schema_version"] = self.schema_version
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name in data:
                kwargs[field.name] = _rebuild(hints[field.name], data[field.name])
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write strict JSON (a non-finite number becomes null: no NaN or Infinity tokens, which
    JSON does not have) to a temporary file beside ``path``, then rename it into place."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def strict_json(data: Any) -> Any:
    """``data`` with numpy scalars as Python numbers and every non-finite float replaced by
    None, so it serialises as strict JSON."""
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` beside ``path`` and rename it into place, with the mode an ordinary new
    file gets under the umask (a temporary file is created private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# plan


@dataclasses.dataclass(frozen=True)
class LayerDecision(Artifact):
    """What the plan does to one compressible layer, and why.

    Schemes: weight ``fp32 | int8_sym_per_channel | int4_sym_group<g>``; activation ``fp32 |
    int8_sym_per_tensor | uint8_per_tensor`` (zero point 0, for inputs that calibration shows are
    never negative); sparsity ``none | 2:4``. The post-training planner emits INT8 and ``none``
    only; ``deploycomp.compress`` also trains INT4 and 2:4 decisions.
    """

    name: str
    onnx_node: str  # the node in the fp32 ONNX graph this decision applies to
    kind: str  # "linear" | "conv2d" | "conv2d_depthwise" | "conv2d_grouped" | "matmul"
    weight_shape: tuple[int, ...]
    macs: int
    weight: str
    activation: str
    sparsity: str
    reason: str
    predicted_fp32_ms: float | None = None
    predicted_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class CompressionPlan(Artifact):
    model_name: str
    target_id: str
    batch_size: int
    layers: tuple[LayerDecision, ...]
    seed: int
    deploycomp_version: str = __version__

    def decision(self, name: str) -> LayerDecision:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# export


@dataclasses.dataclass(frozen=True)
class TensorSpec(Artifact):
    name: str
    shape: tuple[int | str, ...]  # str for a dynamic axis ("batch")
    dtype: str  # numpy dtype name


@dataclasses.dataclass(frozen=True)
class ExportedModel(Artifact):
    """The QDQ ONNX model that carries every decision, and the fp32 ONNX baseline beside it."""

    path: str  # model.onnx (QDQ), relative to the run directory
    baseline_path: str  # model_fp32.onnx
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    checks: dict[str, float]  # max_abs_error, sqnr_db, top1_agreement vs the torch model
    quantized_nodes: int
    versions: dict[str, str]


# --------------------------------------------------------------------------------------------
# lower


@dataclasses.dataclass(frozen=True)
class Engine(Artifact):
    """A backend artifact on disk, ready to load."""

    backend: str
    variant: str  # "compiled" | "fp32" | "default_precision"
    path: str  # directory of the engine, relative to the run directory
    files: tuple[str, ...]
    device: str  # "cpu", "cuda:0"
    precision: str  # what the engine computes in: "int8", "fp32", "bf16", ...
    build_seconds: float
    build_config: dict[str, Any]
    backend_version: str
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EngineLayer(Artifact):
    """One layer of a built GPU engine as the engine itself reports it (``layers.json``).

    Written by backends that choose kernels per layer (TensorRT from its engine inspector, the
    torch backend from its own kernel choice), read by the report, so a user sees per layer which
    precision ran and whether a 2:4 layer really got a sparse kernel.
    """

    name: str  # the ONNX node (or TensorRT layer) name
    op: str  # "matmul", "gemm", "conv", ... or the engine's own layer type
    precision: str  # what the layer computes in: "int8", "fp16", "int4 w-only", ...
    sparse: bool  # a 2:4 sparse kernel was chosen
    sparse_weights: bool  # the weights have the 2:4 pattern (a sparse kernel was possible)
    kernel: str = ""  # the tactic or kernel name
    note: str = ""  # e.g. why a 2:4 layer runs dense ("dense measured 0.21 ms < sparse 0.25 ms")


# --------------------------------------------------------------------------------------------
# measure


@dataclasses.dataclass(frozen=True)
class LatencyStats(Artifact):
    batch_size: int
    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float  # samples per second at the median latency


@dataclasses.dataclass(frozen=True)
class LatencyRow(Artifact):
    """One engine's latency at one batch size, measured on ``measured_on`` (never the target
    unless they are the same device)."""

    backend: str
    variant: str
    precision: str
    measured_on: str
    stats: LatencyStats


@dataclasses.dataclass(frozen=True)
class AccuracyRow(Artifact):
    """One engine's accuracy on one evaluation set."""

    backend: str
    variant: str
    eval_set: str
    metric: str  # "top1" (labelled) or "" for agreement-only sets
    value: float | None  # the task metric, None on unlabelled sets
    num_samples: int
    top1_agreement: float | None  # with the fp32 torch model's outputs
    cosine: float | None
    sqnr_db: float | None
    finite: bool


@dataclasses.dataclass(frozen=True)
class MachineLoad(Artifact):
    """How busy the machine was with other work while latency was measured."""

    other_cpu_fraction: float  # CPU time of other processes / (wall time x cores)
    loadavg_1m: float
    attempts: int
    idle: bool


@dataclasses.dataclass(frozen=True)
class MeasurementResult(Artifact):
    latency: tuple[LatencyRow, ...]
    accuracy: tuple[AccuracyRow, ...]
    machine_load: MachineLoad | None
    threads: int
    pinned_cpus: tuple[int, ...]
    environment: dict[str, Any]

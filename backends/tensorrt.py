"""TensorRT 10 / 11 on an NVIDIA GPU: a strongly typed network from the QDQ ONNX, serialized engine.

``build`` first lowers and checks the QDQ model on our side of the API: int32 bias
DequantizeLinear nodes (which TensorRT rejects) are folded into float biases, then
:func:`~deploycomp.backends.tensorrt_lint.lint_qdq_for_tensorrt` checks TensorRT's explicit
quantization rules; errors fail the build, warnings become engine notes. TensorRT then parses the
model into a strongly typed network (the Q/DQ nodes, not builder flags, decide each layer's
precision; TensorRT 11 has no precision flags at all), builds with ``SPARSE_WEIGHTS`` so 2:4
weights can use sparse tensor cores and one optimization profile for a dynamic batch axis, and
writes ``model.engine``, the engine inspector's layer information as it came
(``tensorrt_layers.json``) and normalized (``layers.json``: per layer the precision, the tactic and
whether it is a sparse kernel). ``load`` deserializes the engine and runs it on torch CUDA tensors
with ``execute_async_v3``; ``bind`` keeps the inputs on the device, so a timed call is the
engine's device work alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from deploycomp.artifacts import Engine, EngineLayer
from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.errors import BackendError

ENGINE_FILE = "model.engine"
RAW_LAYERS_FILE = "tensorrt_layers.json"  # the engine inspector's JSON, unchanged
DEFAULT_MAX_BATCH = 64
DENSE_2_4_NOTE = "2:4 weights but TensorRT chose a dense kernel"
_DIST_NAMES = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11")
_SKIPPED_LAYER_TYPES = ("NoOp", "signal", "wait")  # no compute: stream synchronization, aliases
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# Element types in inspector strings, most specific first ("BFloat16" before "Float").
_DTYPES = (
    (re.compile(r"\b(bfloat16|bf16)\b"), "bf16"),
    (re.compile(r"\b(fp16|half)\b"), "fp16"),
    (re.compile(r"\bfp8\b"), "fp8"),
    (re.compile(r"\bfp4\b"), "fp4"),
    (re.compile(r"\buint8\b"), "uint8"),
    (re.compile(r"\bint8\b"), "int8"),
    (re.compile(r"\bint4\b"), "int4"),
    (re.compile(r"\bint32\b"), "int32"),
    (re.compile(r"\bint64\b"), "int64"),
    (re.compile(r"\b(fp32|float)\b"), "fp32"),
    (re.compile(r"\bbool\b"), "bool"),
)
_FLOAT_DTYPES = ("fp32", "fp16", "bf16")
_OPS = {
    "Convolution": "conv", "MatrixMultiply": "matmul", "Gemm": "gemm", "FullyConnected": "gemm",
    "Pooling": "pool", "Reformat": "reformat", "Shuffle": "shuffle", "PointWise": "pointwise",
    "PointWiseV2": "pointwise", "ElementWise": "elementwise", "Activation": "activation",
    "Scale": "scale", "Softmax": "softmax", "Reduce": "reduce", "Gather": "gather",
    "Quantize": "quantize", "Dequantize": "dequantize", "Constant": "constant",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Our side of the API: lowering, linting and reading the inspector's output (no TensorRT import)


def fold_bias_dequantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every DequantizeLinear of a constant int32 tensor folded into a
    float32 initializer, and how many were folded.

    The exporter stores W8A8 Conv/Gemm biases as int32 at scale ``s_x * s_w`` (what the CPU
    backends fold into their integer kernels); TensorRT's DequantizeLinear takes INT8/INT4/FP8/FP4
    only and rejects int32 ("only activation types allowed as input to this layer",
    onnx/onnx-tensorrt#850). The float bias is computed as ONNX defines it, in float32, so the
    graph computes the same numbers; TensorRT fuses it into the kernel's epilogue.

    Example:
        >>> lowered, folded = fold_bias_dequantize(onnx.load("model.onnx"))
    """
    inits = {i.name: i for i in model.graph.initializer}
    nodes, folded = [], []
    for node in model.graph.node:
        data = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if data is None or data.data_type != onnx.TensorProto.INT32:
            nodes.append(node)
            continue
        if any(name and name not in inits for name in node.input[1:]):
            nodes.append(node)  # a run-time scale: left for the linter to report
            continue
        q = numpy_helper.to_array(data)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(inits[node.input[2]])
                if len(node.input) > 2 and node.input[2] else np.zeros((), np.int32))  # fmt: skip
        if scale.ndim == 1 and q.ndim > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        value = (q - zero).astype(np.float32) * scale
        folded.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if folded:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        used = {name for n in nodes for name in n.input} | {o.name for o in model.graph.output}
        kept = [i for i in model.graph.initializer if i.name in used]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept + folded)
    return out, len(folded)


class PreparedModel(NamedTuple):
    """The model TensorRT is given, and what lowering and linting found."""

    model: onnx.ModelProto
    folded_biases: int
    warnings: list[str]
    notes: list[str]


def prepare_onnx(onnx_path: str | Path) -> PreparedModel:
    """Load the QDQ ONNX model, fold its int32 biases and lint it for TensorRT.

    Raises:
        BackendError: the file is not a valid ONNX model, or the linter found errors (listed).

    Example:
        >>> prepared = prepare_onnx("out/run/model.onnx")
        >>> prepared.warnings
        []
    """
    from deploycomp.backends.onnxruntime import validate_onnx
    from deploycomp.backends.tensorrt_lint import ERROR, NOTE, lint_qdq_for_tensorrt

    validate_onnx(Path(onnx_path))
    model, folded = fold_bias_dequantize(onnx.load(str(onnx_path)))
    issues = lint_qdq_for_tensorrt(model)
    errors = [str(i) for i in issues if i.severity == ERROR]
    if errors:
        raise BackendError(
            f"{Path(onnx_path).name!r} breaks {len(errors)} of TensorRT's explicit-quantization "
            "rules; TensorRT would reject it or run these layers in another precision than "
            "planned:\n  " + "\n  ".join(errors)
        )
    warnings = [str(i) for i in issues if i.severity not in (ERROR, NOTE)]
    notes = [str(i) for i in issues if i.severity == NOTE]
    return PreparedModel(model, folded, warnings, notes)


def read_layer_information(text: str) -> dict[str, Any]:
    """Parse the inspector's JSON. Not strict: TensorRT writes raw U+001E/U+001F separators
    inside the Metadata strings (NVIDIA/TensorRT#2779), control characters JSON forbids.

    Raises:
        BackendError: the text is not a JSON object.
    """
    try:
        raw = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        raise BackendError(f"TensorRT's layer information is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BackendError(f"TensorRT's layer information is a {type(raw).__name__}, not an object")
    return raw


def _dtype(text: str) -> str:
    text = text.lower()
    return next((name for pattern, name in _DTYPES if pattern.search(text)), "")


def _tensor_dtype(tensor: Any) -> str:
    """A tensor's element type: TensorRT 11 has a ``DataType`` field; 10.x writes the type inside
    ``Format/Datatype`` ("Row major linear FP32 format (kLINEAR)", "Int8", "Half")."""
    if not isinstance(tensor, dict):
        return ""
    return _dtype(str(tensor.get("DataType") or tensor.get("Format/Datatype") or ""))


def _precision(layer: dict[str, Any]) -> str:
    inputs = [_tensor_dtype(t) for t in layer.get("Inputs") or []]
    outputs = [_tensor_dtype(t) for t in layer.get("Outputs") or []]
    weights = layer.get("Weights")
    weight = _dtype(str(weights.get("Type", ""))) if isinstance(weights, dict) else ""
    activation = next((t for t in inputs if t), "") or next((t for t in outputs if t), "")
    if weight == "int4" or "int4" in inputs[1:]:
        return "int4 w-only" if activation in _FLOAT_DTYPES else "int4"
    if weight == "int8" or activation == "int8":
        return "int8"
    return activation or weight or "unknown"


def parse_layer_information(
    raw: dict[str, Any], sparse_weight_nodes: set[str]
) -> list[EngineLayer]:
    """Normalize the engine inspector's JSON into :class:`EngineLayer` rows.

    ``raw`` is ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` of an
    engine built with ``ProfilingVerbosity.DETAILED``: ``{"Layers": [{"Name", "LayerType",
    "ParameterType", "Inputs"/"Outputs": [{"Name", "Dimensions", "Format/Datatype"}],
    "Weights": {"Type", "Count"}, "TacticName", "Metadata": "[ONNX Layer: name]..."}, ...]}``.
    A layer counts as sparse when its tactic name says "sparse" (TensorRT names its sparse
    tensor-core kernels so); it has 2:4 weights when one of the ONNX nodes in its Metadata (or,
    without Metadata, in its fused name) is in ``sparse_weight_nodes``.

    Raises:
        BackendError: no ``Layers`` list, or layers given by name only (the engine was built
            without detailed profiling verbosity).

    Example:
        >>> layers = parse_layer_information(raw, {"/classifier/classifier.1/Gemm"})
        >>> [(la.precision, la.sparse) for la in layers if la.sparse_weights]
        [('int8', True)]
    """
    layers = raw.get("Layers")
    if not isinstance(layers, list):
        raise BackendError(f"TensorRT's layer information has no 'Layers' list: keys {list(raw)}")
    out = []
    for layer in layers:
        if not isinstance(layer, dict):
            raise BackendError(
                f"TensorRT's layer information lists layers by name only ({str(layer)[:80]!r}); "
                "build with ProfilingVerbosity.DETAILED to get their precision and tactic."
            )
        kind = str(layer.get("ParameterType") or layer.get("LayerType") or "")
        if kind in _SKIPPED_LAYER_TYPES or layer.get("LayerType") in _SKIPPED_LAYER_TYPES:
            continue
        name = str(layer.get("Name", ""))
        onnx_nodes = set(_ONNX_LAYER.findall(str(layer.get("Metadata") or "")))
        onnx_nodes = onnx_nodes or {part.strip() for part in name.split(" + ")}
        tactic = str(layer.get("TacticName") or "")
        sparse = "sparse" in tactic.lower()
        sparse_weights = bool(onnx_nodes & sparse_weight_nodes)
        out.append(EngineLayer(
            name=name, op=_OPS.get(kind, kind.lower()), precision=_precision(layer),
            sparse=sparse, sparse_weights=sparse_weights, kernel=tactic,
            note=DENSE_2_4_NOTE if sparse_weights and not sparse else "",
        ))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# TensorRT's side: availability, build, run


def _cuda_available() -> bool:
    import torch  # imported lazily: availability() must stay cheap where no GPU exists

    return bool(torch.cuda.is_available())


def _tensorrt_version() -> str:
    for dist in _DIST_NAMES:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _logger() -> Any:
    import tensorrt as trt  # optional backend library: imported only when used

    return trt.Logger(trt.Logger.WARNING)


def _torch_dtype(trt_dtype: Any) -> Any:
    import torch

    dtypes = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
        "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64,
        "BOOL": torch.bool,
    }  # fmt: skip
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in dtypes:
        raise BackendError(
            f"the engine has an input or output of TensorRT type {name!r}; the tensorrt backend "
            f"exchanges {sorted(dtypes)} only. Keep the model's inputs and outputs float or int."
        )
    return dtypes[name]


class TensorRtSession(Session):
    """A deserialized engine and one execution context on its own CUDA stream.

    ``run`` copies the numpy inputs to device tensors, enqueues the engine, waits for it and
    returns the outputs on the host. ``bind`` does the copies and the shape and address setup
    once; the call it returns enqueues the engine and waits for it, so latency measurement times
    the engine's device work, as a server that keeps its buffers on the GPU sees it.
    """

    def __init__(self, engine: Any, device: str) -> None:
        import tensorrt as trt  # optional backend library: imported only when used
        import torch

        self._torch = torch
        self._engine = engine
        self._context = engine.create_execution_context()
        self._device = torch.device(device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self._output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._stream = torch.cuda.Stream(self._device)
        self._bound: list[Any] | None = None  # the tensors the context points at

    def _bind_buffers(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        """Device copies of the inputs and fresh outputs (inputs first), the context pointed at
        them."""
        torch = self._torch
        tensors = []
        with torch.cuda.stream(self._stream):
            for name in self.input_names:
                array = np.ascontiguousarray(inputs[name])
                tensors.append(torch.from_numpy(array).to(self._device, self._dtypes[name]))
            self._point_at(tensors[: len(self.input_names)])
            for name in self._output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                tensors.append(torch.empty(shape, dtype=self._dtypes[name], device=self._device))
        self._point_at(tensors)
        return tensors

    def _point_at(self, tensors: list[Any]) -> None:
        """Set the context's input shapes and the addresses of ``tensors`` (inputs, outputs)."""
        for name, tensor in zip(self.input_names, tensors):
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                raise BackendError(
                    f"input {name!r} of shape {tuple(tensor.shape)} is outside the engine's "
                    "optimization profile; rebuild with BuildConfig(extra={'max_batch_size': "
                    "...}) covering this batch."
                )
        for name, tensor in zip(self.input_names + self._output_names, tensors):
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._bound = tensors

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed; see the TensorRT log above.")
        self._stream.synchronize()

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        tensors = self._bind_buffers(inputs)
        self._execute()
        return [out.cpu().numpy() for out in tensors[len(self.input_names) :]]

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        tensors = self._bind_buffers(inputs)
        self._stream.synchronize()  # the input copies are not part of the timed call

        def call() -> None:
            if self._bound is not tensors:  # another run or bind pointed the context elsewhere
                self._point_at(tensors)
            self._execute()

        call.buffers = tensors  # the context points at them; kept alive as long as the call
        return call


def _add_profile(builder: Any, network: Any, builder_config: Any, max_batch: int) -> dict:
    """One optimization profile: batch 1 to ``max_batch`` (tuned at ``max_batch``) on a dynamic
    axis 0, the static shape elsewhere. Returns input name -> [min, opt, max] shapes."""
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise BackendError(
                f"input {tensor.name!r} has dynamic axes besides the batch {dims}; the "
                "tensorrt backend supports a dynamic batch axis only. Export with fixed shapes."
            )
        low = high = dims
        if dims and dims[0] < 0:
            low, high = (1, *dims[1:]), (max_batch, *dims[1:])
        profile.set_shape(tensor.name, low, high, high)
        shapes[tensor.name] = [list(low), list(high), list(high)]
    builder_config.add_optimization_profile(profile)
    return shapes


class TensorRtBackend(Backend):
    name = "tensorrt"
    engine_file = ENGINE_FILE
    devices = ("cuda",)

    def availability(self) -> Availability:
        try:
            installed = importlib.util.find_spec("tensorrt") is not None
            gpu = _cuda_available()
        except (ImportError, OSError, RuntimeError, ValueError) as exc:  # never raises
            return Availability(False, f"TensorRT availability check failed: {exc}")
        missing = []
        if not installed:
            missing.append(
                "TensorRT is not installed (pip install tensorrt; the wheels come from NVIDIA's "
                "package index, pypi.nvidia.com)"
            )
        if not gpu:
            missing.append("no NVIDIA GPU is visible to CUDA (TensorRT runs on NVIDIA GPUs only)")
        if missing:
            return Availability(False, " and ".join(missing))
        version = _tensorrt_version()
        return Availability(True, f"TensorRT {version} with a CUDA GPU", version)

    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        from deploycomp.backends.onnxruntime import onnx_precision
        from deploycomp.backends.tensorrt_lint import sparse_weight_nodes
        from deploycomp.report.engine_layers import write_engine_layers

        prepared = prepare_onnx(onnx_path)

        import tensorrt as trt  # optional backend library: imported only when used

        major = int(trt.__version__.split(".")[0])
        logger = _logger()
        builder = trt.Builder(logger)
        # TensorRT 11 always builds strongly typed networks (the flag is deprecated and ignored);
        # 10 must be asked, or it may pick other precisions than the Q/DQ nodes say. Networks
        # are explicit-batch in both; EXPLICIT_BATCH is deprecated in 10 and gone in 11.
        flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(prepared.model.SerializeToString(), str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {onnx_path.name!r}: {errors}")

        builder_config = builder.create_builder_config()
        builder_config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if config.variant == "fp32":  # the true fp32 baseline: no TF32 in float GEMMs
            builder_config.clear_flag(trt.BuilderFlag.TF32)
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        max_batch = int(config.extra.get("max_batch_size", DEFAULT_MAX_BATCH))
        shapes = _add_profile(builder, network, builder_config, max_batch)

        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name!r}.")
        (out_dir / ENGINE_FILE).write_bytes(bytes(serialized))
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        text = engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON
        )
        (out_dir / RAW_LAYERS_FILE).write_text(text)
        layers = parse_layer_information(
            read_layer_information(text), sparse_weight_nodes(prepared.model)
        )
        write_engine_layers(out_dir, self.name, layers)

        notes = list(prepared.warnings)
        sparse = sum(layer.sparse for layer in layers)
        dense_2_4 = sum(layer.sparse_weights and not layer.sparse for layer in layers)
        if sparse:
            notes.append(f"{sparse} layers run 2:4 sparse kernels")
        if dense_2_4:
            notes.append(f"{dense_2_4} layers with 2:4 weights run dense kernels")
        build_config = {
            "network_flags": ["STRONGLY_TYPED"],
            "builder_flags": ["SPARSE_WEIGHTS"] + ([] if config.variant == "fp32" else ["TF32"]),
            "profile_shapes": shapes,
            "folded_int32_biases": prepared.folded_biases,
            "qdq_lint": {"warnings": len(prepared.warnings), "notes": len(prepared.notes)},
            "tensorrt_version": trt.__version__,
        }
        return onnx_precision(prepared.model), build_config, notes

    def _load(self, engine: Engine, threads: int) -> Session:
        import tensorrt as trt  # optional backend library: imported only when used

        path = Path(engine.path) / ENGINE_FILE
        trt_engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
        if trt_engine is None:
            raise BackendError(
                f"TensorRT could not deserialize {str(path)!r}; it was built by another TensorRT "
                "version or for another GPU. Rebuild the engine on this machine."
            )
        device = engine.device if engine.device.startswith("cuda") else "cuda:0"
        return TensorRtSession(trt_engine, device)

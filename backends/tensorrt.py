"""TensorRT 10 on an NVIDIA GPU: a strongly typed network from the QDQ ONNX, serialized engine.

``build`` parses the ONNX file into a STRONGLY_TYPED network (the Q/DQ nodes, not builder flags,
decide each layer's precision), sets ``SPARSE_WEIGHTS`` so 2:4 weights can use sparse tensor
cores, adds one optimization profile for a dynamic batch axis, and writes ``model.engine`` plus
the engine inspector's layer information (``layers.json``: which tactic and precision each layer
got). ``load`` deserializes the engine and runs it with ``execute_async_v3`` on torch CUDA
tensors, synchronizing before returning, so a timed ``run`` covers the device work.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from deploycomp.artifacts import Engine
from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.errors import BackendError

ENGINE_FILE = "model.engine"
LAYERS_FILE = "layers.json"
_DIST_NAMES = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11")


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


class TensorRtSession(Session):
    """A deserialized engine and one execution context; inputs and outputs are CUDA tensors."""

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
        self._output_dtypes = {
            n: torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(n)))).dtype
            for n in self._output_names
        }

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        keep_alive = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._device)
            keep_alive.append(tensor)
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self._output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._output_dtypes[name], device=self._device)
            self._context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self._device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed; see the TensorRT log above.")
        stream.synchronize()
        return [out.cpu().numpy() for out in outputs]


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
                "TensorRT is not installed (pip install tensorrt needs NVIDIA's package index)"
            )
        if not gpu:
            missing.append("no NVIDIA GPU is present")
        if missing:
            return Availability(False, " and ".join(missing))
        version = _tensorrt_version()
        return Availability(True, f"TensorRT {version} with a CUDA GPU", version)

    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        import tensorrt as trt  # optional backend library: imported only when used

        from deploycomp.backends.onnxruntime import onnx_precision, validate_onnx

        precision = onnx_precision(validate_onnx(onnx_path))
        logger = _logger()
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {onnx_path.name!r}: {errors}")

        builder_config = builder.create_builder_config()
        builder_config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        max_batch = int(config.extra.get("max_batch_size", 64))
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = tuple(tensor.shape)
            if any(d < 0 for d in dims[1:]):
                raise BackendError(
                    f"input {tensor.name!r} has dynamic axes besides the batch {dims}; the "
                    "tensorrt backend supports a dynamic batch axis only."
                )
            rest = dims[1:]
            profile.set_shape(tensor.name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
        builder_config.add_optimization_profile(profile)

        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name!r}.")
        (out_dir / ENGINE_FILE).write_bytes(bytes(serialized))
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        inspector = engine.create_engine_inspector()
        layers_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        (out_dir / LAYERS_FILE).write_text(layers_json)
        build_config = {
            "network_flags": ["STRONGLY_TYPED"],
            "builder_flags": ["SPARSE_WEIGHTS"],
            "profile_batch": [1, max_batch, max_batch],
            "tensorrt_version": trt.__version__,
        }
        return precision, build_config, []

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

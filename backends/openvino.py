"""OpenVINO on the CPU: ONNX to IR (``model.xml``/``model.bin``), compiled with explicit settings.

The inference precision is always a recorded decision. On a CPU with AVX512_BF16 or AMX, OpenVINO
runs fp32 models in bf16 unless told otherwise, so the ``compiled`` and ``fp32`` variants compile
with ``INFERENCE_PRECISION_HINT=f32`` (the INT8 parts of a QDQ model still run in INT8), while
``default_precision`` compiles with no hint and records what the plugin chose. Latency settings
(``PERFORMANCE_HINT=LATENCY``, one stream, pinned threads) are written into ``engine.json`` at
build and used again at load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from deploycomp.artifacts import Engine
from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.backends.onnxruntime import allowed_cpus, onnx_precision, validate_onnx
from deploycomp.errors import BackendError

ENGINE_FILE = "model.xml"
_VARIANTS = ("compiled", "fp32", "default_precision")
# OpenVINO element type names -> the precision names used in deploycomp artifacts.
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_COMPUTE_LAYERS = frozenset({"Convolution", "FullyConnected", "MatMul", "GroupConvolution"})


def _compile_config(variant: str, threads: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "ENABLE_CPU_PINNING": True,
        "NUM_STREAMS": 1,
    }
    if variant != "default_precision":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def _runtime_precisions(compiled_model: Any) -> dict[str, int]:
    """Count of compute layers per ``layer_type:precision`` that the CPU plugin actually chose."""
    counts: dict[str, int] = {}
    try:
        for op in compiled_model.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer_type = info["layerType"].astype(str)
            if layer_type in _COMPUTE_LAYERS:
                key = f"{layer_type}:{info['runtimePrecision'].astype(str)}"
                counts[key] = counts.get(key, 0) + 1
    except (KeyError, AttributeError, RuntimeError):
        return {}  # diagnostics only: the runtime model's rt_info keys are not a stable API
    return dict(sorted(counts.items()))


class OpenVinoSession(Session):
    """A compiled model and one reused ``InferRequest``; outputs are copied to numpy."""

    def __init__(self, compiled_model: Any) -> None:
        self._compiled_model = compiled_model
        self._request = compiled_model.create_infer_request()
        self.input_names = [port.get_any_name() for port in compiled_model.inputs]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(inputs, share_inputs=True, share_outputs=False)
        return list(results.to_tuple())


class OpenVinoBackend(Backend):
    name = "openvino"
    engine_file = ENGINE_FILE

    def availability(self) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(
                False, "openvino is not installed: pip install 'deploycomp[openvino]'"
            )
        version = importlib.metadata.version("openvino")
        return Availability(True, f"openvino {version} (CPU plugin)", version)

    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        import openvino as ov  # optional backend library: imported only when used

        if config.variant not in _VARIANTS:
            raise BackendError(
                f"unknown build variant {config.variant!r}; expected one of {list(_VARIANTS)}."
            )
        onnx_precision_name = onnx_precision(validate_onnx(onnx_path))
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as exc:
            raise BackendError(
                f"openvino cannot convert {onnx_path.name!r}: {str(exc).strip()[:600]}. "
                "Export with standard operators, or pick another backend."
            ) from exc
        ov.save_model(model, str(out_dir / ENGINE_FILE), compress_to_fp16=False)

        threads = config.threads or len(allowed_cpus())
        compile_config = _compile_config(config.variant, threads)
        compiled = ov.Core().compile_model(str(out_dir / ENGINE_FILE), "CPU", compile_config)
        reported_type = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        reported = _PRECISION_NAMES.get(reported_type, reported_type)
        notes = []
        if config.variant == "default_precision":
            notes.append(
                f"compiled with no INFERENCE_PRECISION_HINT; the CPU plugin reports {reported} "
                "as its inference precision for floating-point layers."
            )
        precision = onnx_precision_name if onnx_precision_name != "fp32" else reported
        build_config = {
            **compile_config,
            "device": "CPU",
            "inference_precision_reported": reported,
            "compress_to_fp16": False,
            "runtime_precisions": _runtime_precisions(compiled),
            "openvino_version": ov.get_version(),
        }
        return precision, build_config, notes

    def _load(self, engine: Engine, threads: int) -> Session:
        import openvino as ov  # optional backend library: imported only when used

        path = Path(engine.path) / ENGINE_FILE
        threads = threads or engine.build_config.get("INFERENCE_NUM_THREADS") or len(allowed_cpus())
        compile_config = _compile_config(engine.variant, threads)
        try:
            compiled = ov.Core().compile_model(str(path), "CPU", compile_config)
        except Exception as exc:
            raise BackendError(f"openvino failed to compile {str(path)!r}: {exc}") from exc
        return OpenVinoSession(compiled)

"""The two peer quantizers that ``peers.py`` measures deploycomp's INT8 against.

``quantize_with_onnxruntime`` runs ONNX Runtime's ``quantize_static`` (QDQ, per-channel, default
INT8 types) and ``quantize_with_nncf`` runs NNCF post-training quantization on the OpenVINO model
converted from the same fp32 ONNX; both calibrate on exactly the batches they are given.
``load_openvino_ir`` compiles an IR with the settings deploycomp's openvino backend uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# ---- peer A: ONNX Runtime quantize_static -------------------------------------------------------


class _BatchReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over the spec's calibration batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            return None
        self._index += 1
        return dict(self._batches[self._index - 1])

    def rewind(self) -> None:
        self._index = 0


def quantize_with_onnxruntime(fp32_path: Path, calibration: list, out_dir: Path) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    reader = type("Reader", (_BatchReader, CalibrationDataReader), {})(calibration)
    pre_path, out_path = out_dir / "ort_pre.onnx", out_dir / "ort_qdq.onnx"
    try:
        quant_pre_process(str(fp32_path), str(pre_path))
        source, pre_note = pre_path, "quant_pre_process applied (shape inference + optimization)"
    except Exception as exc:  # noqa: BLE001 (optional step: quantize the raw fp32 model)
        source, pre_note = fp32_path, f"quant_pre_process failed ({exc!s:.200}); raw fp32 used"
    settings = {
        "quant_format": "QDQ",
        "per_channel": True,
        "reduce_range": False,
        "activation_type": "QInt8 (default)",
        "weight_type": "QInt8 (default)",
        "calibrate_method": "MinMax (default)",
        "activation_symmetric": "False (default)",
        "weight_symmetric": "True (default for QInt8 weights)",
    }
    quantize_static(
        str(source),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return {"path": out_path, "settings": settings, "pre_process": pre_note}


# ---- peer B: NNCF post-training quantization ---------------------------------------------------


def quantize_with_nncf(fp32_path: Path, calibration: list, model_name: str, out_dir: Path) -> dict:
    import nncf  # optional peer: the caller checks it is installed
    import openvino as ov

    ov_model = ov.convert_model(str(fp32_path))
    kwargs: dict[str, Any] = {"subset_size": len(calibration)}  # NNCF counts dataset items
    if model_name == "minilm-l6":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(ov_model, nncf.Dataset([dict(b) for b in calibration]), **kwargs)
    path = out_dir / "model.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    settings = {
        "subset_size_items": len(calibration),
        "samples": sum(len(next(iter(b.values()))) for b in calibration),
        "model_type": "TRANSFORMER" if "model_type" in kwargs else "default (CNN)",
        "preset": "default (PERFORMANCE: symmetric activations)",
        "nncf_version": nncf.__version__,
    }
    return {"path": path, "settings": settings}


def load_openvino_ir(xml_path: Path, threads: int) -> Any:
    """Compile an IR with exactly the settings deploycomp's openvino backend uses for INT8."""
    import openvino as ov

    from deploycomp.backends.openvino import OpenVinoSession, _compile_config

    return OpenVinoSession(
        ov.Core().compile_model(str(xml_path), "CPU", _compile_config("compiled", threads))
    )

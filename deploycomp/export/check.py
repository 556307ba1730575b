"""Checks of the exported graphs against the torch model, run before anything is lowered.

The fp32 graph must reproduce the torch model (an export bug otherwise); the QDQ graph is compared
with the same reference for quantization fidelity (SQNR, top-1 agreement, cosine) and must produce
finite outputs. Both run in ONNX Runtime on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deploycomp.errors import ExportError
from deploycomp.measure.accuracy import compare_outputs
from deploycomp.modelspec import Batch

FP32_RELATIVE_TOLERANCE = 1e-3


def ort_runner(path: str) -> Callable[[Batch], np.ndarray]:
    import onnxruntime as ort  # the reference runtime of every check; a core dependency

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, batch)[0]


def check_exported(
    reference: Callable[[Batch], np.ndarray],
    fp32_path: str,
    qdq_path: str,
    batches: Sequence[Batch],
) -> dict[str, float]:
    """Compare both graphs with ``reference`` on ``batches``.

    Raises:
        ExportError: the fp32 graph differs from the reference beyond tolerance, or the QDQ graph
            produced a non-finite output.
    """
    ref = np.concatenate([reference(b) for b in batches])
    fp32 = np.concatenate([ort_runner(fp32_path)(b) for b in batches])
    max_error = float(np.abs(fp32 - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not max_error <= FP32_RELATIVE_TOLERANCE * scale:
        raise ExportError(
            f"the exported fp32 ONNX differs from the torch model by {max_error:.3g} (max abs); "
            f"expected at most {FP32_RELATIVE_TOLERANCE * scale:.3g}. The model may use an "
            "operator the exporter translates differently; check it with torch.onnx.export."
        )
    qdq = np.concatenate([ort_runner(qdq_path)(b) for b in batches])
    cmp = compare_outputs(ref, qdq)
    if not cmp["finite"]:
        raise ExportError(
            "the quantized ONNX model produced NaN or infinite outputs on calibration data; "
            "the calibration ranges are unusable (check the data for extreme values)."
        )
    return {
        "fp32_max_abs_error": max_error,
        "qdq_max_abs_error": float(np.abs(qdq - ref).max()),
        "qdq_sqnr_db": float(cmp["sqnr_db"]),
        "qdq_top1_agreement": float(cmp["top1_agreement"]),
        "qdq_cosine": float(cmp["cosine"]),
        "samples": float(ref.shape[0]),
    }

"""Checks of the exported graphs against the torch model, run before anything is lowered.

The fp32 graph must reproduce the torch model (an export bug otherwise); the QDQ graph is compared
with the same reference for quantization fidelity (SQNR, top-1 agreement, cosine), must produce
finite outputs, and must not be nonsense: ``QDQ_MIN_COSINE`` and ``QDQ_MIN_TOP1_AGREEMENT`` are
floors far below any working INT8 model (the zoo's worst, EfficientNet-Lite0, keeps cosine 0.94 and
72% top-1 agreement on its calibration batches), which a model whose ranges are broken, e.g. by an
extreme calibration value, falls under. Both graphs run in ONNX Runtime on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from deploycomp.errors import ExportError
from deploycomp.measure.accuracy import compare_outputs
from deploycomp.modelspec import Batch

FP32_RELATIVE_TOLERANCE = 1e-3
QDQ_MIN_COSINE = 0.5
QDQ_MIN_TOP1_AGREEMENT = 0.05
# Top-1 agreement is judged on at least this many samples: on fewer, a sound model can miss
# the floor by chance on low-margin samples.
MIN_AGREEMENT_SAMPLES = 16


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
    *,
    floors: bool = True,
) -> dict[str, float]:
    """Compare both graphs with ``reference`` on ``batches``.

    ``floors`` holds the QDQ graph to ``QDQ_MIN_COSINE`` and ``QDQ_MIN_TOP1_AGREEMENT`` against
    ``reference``. Pass False where the QDQ graph is meant to depart from ``reference`` (a
    trained compressed student, whose export is checked against the student instead).

    Samples on which the torch model itself gives NaN or infinity (an extreme input value can
    overflow it) are left out: there is nothing to compare them with. Their count is recorded
    as ``reference_nonfinite_samples`` when there are any.

    Raises:
        ExportError: the torch model gives no finite output at all, the fp32 graph differs from
            the reference beyond tolerance, or the QDQ graph produced a non-finite output or
            (with ``floors``) misses a fidelity floor (:func:`check_fidelity`).
    """
    ref = np.concatenate([reference(b) for b in batches])
    keep = np.isfinite(ref.reshape(ref.shape[0], -1)).all(axis=1)
    if not keep.any():
        raise ExportError(
            f"the torch model gives NaN or infinite outputs on all {ref.shape[0]} calibration "
            "samples checked; expected finite outputs. Check the model and the calibration data "
            "for extreme values."
        )
    ref = ref[keep]
    fp32 = np.concatenate([ort_runner(fp32_path)(b) for b in batches])[keep]
    max_error = float(np.abs(fp32 - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not max_error <= FP32_RELATIVE_TOLERANCE * scale:
        raise ExportError(
            f"the exported fp32 ONNX differs from the torch model by {max_error:.3g} (max abs); "
            f"expected at most {FP32_RELATIVE_TOLERANCE * scale:.3g}. The model may use an "
            "operator the exporter translates differently; check it with torch.onnx.export."
        )
    qdq = np.concatenate([ort_runner(qdq_path)(b) for b in batches])[keep]
    cmp = compare_outputs(ref, qdq)
    if not cmp["finite"]:
        raise ExportError(
            "the quantized ONNX model produced NaN or infinite outputs on calibration data; "
            "the calibration ranges are unusable (check the data for extreme values)."
        )
    checks = {
        "fp32_max_abs_error": max_error,
        "qdq_max_abs_error": float(np.abs(qdq - ref).max()),
        "qdq_sqnr_db": float(cmp["sqnr_db"]),
        "qdq_top1_agreement": float(cmp["top1_agreement"]),
        "qdq_cosine": float(cmp["cosine"]),
        "samples": float(ref.shape[0]),
    }
    if not keep.all():
        checks["reference_nonfinite_samples"] = float(np.count_nonzero(~keep))
    if floors:
        checks["qdq_min_cosine"] = QDQ_MIN_COSINE
        checks["qdq_min_top1_agreement"] = QDQ_MIN_TOP1_AGREEMENT
        check_fidelity(checks, classes=int(ref.shape[-1]) if ref.ndim >= 2 else 1)
    return checks


def check_fidelity(checks: dict[str, float], classes: int) -> None:
    """Fail a QDQ model whose outputs are nonsense next to the torch model's.

    Top-1 agreement is judged only with ``classes`` > 1 outputs per sample and at least
    ``MIN_AGREEMENT_SAMPLES`` samples; the cosine always.

    Raises:
        ExportError: naming the check, the value measured, the floor and what to try.
    """
    samples = int(checks["samples"])
    advice = (
        "The quantization ranges do not fit the model: check the calibration batches "
        "for extreme values; they should be real inputs like those the model will serve."
    )
    if not checks["qdq_cosine"] >= QDQ_MIN_COSINE:
        raise ExportError(
            f"export check 'QDQ cosine' failed: the quantized ONNX model's outputs keep a mean "
            f"cosine of {checks['qdq_cosine']:.3f} with the torch model's on {samples} "
            f"calibration samples; expected >= {QDQ_MIN_COSINE}. {advice}"
        )
    agreement = checks["qdq_top1_agreement"]
    if classes > 1 and samples >= MIN_AGREEMENT_SAMPLES and agreement < QDQ_MIN_TOP1_AGREEMENT:
        raise ExportError(
            f"export check 'QDQ top-1 agreement' failed: the quantized ONNX model's top-1 agrees "
            f"with the torch model's on {agreement:.1%} of {samples} calibration samples; "
            f"expected >= {QDQ_MIN_TOP1_AGREEMENT:.0%}. {advice}"
        )

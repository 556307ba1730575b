"""Quantization numerics shared by calibration, the QDQ writer, the checks and the backends.

Symmetric INT8 throughout (zero point 0): weights per output channel on [-127, 127] (the narrow
range every backend's INT8 GEMM accepts), activations per tensor, as int8 on [-128, 127] or, for a
tensor that calibration shows is never negative, as uint8 on [0, 255] with zero point 0.
"""

from __future__ import annotations

import numpy as np

INT8_WEIGHT_QMAX = 127
TINY_SCALE = 1e-12


def quantize_weight_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (int8 weight, float32 scale per channel along ``axis``)."""
    moved = np.moveaxis(weight, axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.maximum(amax / INT8_WEIGHT_QMAX, TINY_SCALE).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -INT8_WEIGHT_QMAX, INT8_WEIGHT_QMAX)
    return q.astype(np.int8), scale


def activation_qparams(clip_min: float, clip_max: float, unsigned: bool) -> tuple[float, str]:
    """Scale and storage type for a per-tensor activation with the given clipping range."""
    if unsigned:
        return max(clip_max / 255.0, TINY_SCALE), "uint8"
    return max(max(abs(clip_min), abs(clip_max)) / 127.0, TINY_SCALE), "int8"


def fake_quantize(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
    return np.clip(np.round(x / scale), lo, hi) * scale


def best_clip(abs_samples: np.ndarray, abs_max: float, qmax: int) -> float:
    """Clipping value minimising the squared quantization error on a sample of |x|.

    Candidates run from the 99th percentile up to the true maximum; the sample is what the
    calibration pass kept (a bounded random subsample per batch).
    """
    if abs_samples.size == 0 or abs_max <= 0:
        return float(abs_max)
    lo = float(np.quantile(abs_samples, 0.99))
    candidates = np.unique(np.concatenate([np.linspace(lo, abs_max, 48), [abs_max]]))
    best, best_err = abs_max, np.inf
    for c in candidates:
        if c <= 0:
            continue
        scale = c / qmax
        q = np.minimum(np.round(abs_samples / scale), qmax) * scale
        err = float(np.mean((q - abs_samples) ** 2))
        if err < best_err:
            best, best_err = float(c), err
    return best

"""The shared quantization numerics against their definitions."""

import numpy as np

from deploycomp.kernels.quantize import (
    activation_qparams,
    best_clip,
    fake_quantize,
    quantize_weight_per_channel,
)


def test_weights_per_output_channel_use_the_narrow_symmetric_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.arange(1, 9)[:, None, None, None]
    q, scale = quantize_weight_per_channel(w, axis=0)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    np.testing.assert_allclose(scale, np.abs(w).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    # Each channel's largest weight maps to +-127 and the error is at most half a step.
    assert (np.abs(q).reshape(8, -1).max(axis=1) == 127).all()
    err = np.abs(q * scale[:, None, None, None] - w)
    assert (err <= scale[:, None, None, None] / 2 + 1e-7).all()
    _q1, s1 = quantize_weight_per_channel(w.reshape(8, -1).T.copy(), axis=1)  # [K, N] MatMul layout
    np.testing.assert_allclose(s1, scale, rtol=1e-6)


def test_activation_parameters_and_fake_quantization():
    scale, dtype = activation_qparams(0.0, 6.0, unsigned=True)
    assert dtype == "uint8" and np.isclose(scale, 6.0 / 255)
    scale, dtype = activation_qparams(-3.0, 2.0, unsigned=False)
    assert dtype == "int8" and np.isclose(scale, 3.0 / 127)
    x = np.array([-5.0, -3.0, 0.0, 1.0, 2.9])
    np.testing.assert_allclose(fake_quantize(x, scale, "int8"),
                               np.clip(np.round(x / scale), -128, 127) * scale)
    assert fake_quantize(np.array([-1.0]), 6.0 / 255, "uint8")[0] == 0.0


def _mse(samples, clip, qmax=127):
    scale = clip / qmax
    return float(np.mean((np.minimum(np.round(samples / scale), qmax) * scale - samples) ** 2))


def test_mse_clip_beats_both_ends_of_its_search_range():
    rng = np.random.default_rng(1)
    heavy = np.abs(rng.standard_t(df=2, size=20000))  # heavy tail: clipping pays
    clip = best_clip(heavy, float(heavy.max()), 127)
    assert clip < heavy.max()
    assert _mse(heavy, clip) <= _mse(heavy, float(heavy.max()))
    assert _mse(heavy, clip) <= _mse(heavy, float(np.quantile(heavy, 0.99)))
    uniform = rng.uniform(0, 1, 20000)  # no tail: keep (almost) the whole range
    assert best_clip(uniform, float(uniform.max()), 127) > 0.98

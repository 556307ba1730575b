"""The openvino backend on tiny models built in code; skipped where openvino is not installed."""

from __future__ import annotations

import numpy as np
import pytest

from deploycomp.backends import get_backend
from deploycomp.backends.base import BuildConfig
from deploycomp.errors import BackendError
from deploycomp.measure.accuracy import sqnr_db

pytest.importorskip("openvino", reason="openvino is not installed: pip install openvino")
pytestmark = pytest.mark.openvino

FP32_ATOL = 1e-4
QDQ_MIN_SQNR_DB = 25.0


@pytest.fixture(scope="module")
def backend():
    return get_backend("openvino")


def test_fp32_engine_pins_f32_and_matches_torch(
    backend, fp32_onnx, tiny_inputs, torch_logits, tmp_path
):
    engine = backend.build(fp32_onnx, tmp_path / "engine", BuildConfig(variant="fp32", threads=1))
    assert engine.precision == "fp32"
    assert {"model.xml", "model.bin", "engine.json"} <= set(engine.files) | {"engine.json"}
    assert engine.build_config["INFERENCE_PRECISION_HINT"] == "f32"
    assert engine.build_config["inference_precision_reported"] == "fp32"
    assert engine.build_config["PERFORMANCE_HINT"] == "LATENCY"
    assert engine.build_config["NUM_STREAMS"] == 1
    assert engine.build_config["ENABLE_CPU_PINNING"] is True
    session = backend.load(engine)
    assert list(session.input_names) == ["image"]
    (logits,) = session.run(tiny_inputs)
    np.testing.assert_allclose(logits, torch_logits, atol=FP32_ATOL, rtol=0)
    (again,) = session.run(tiny_inputs)  # the reused request must not alias earlier outputs
    np.testing.assert_array_equal(logits, again)


def test_default_precision_is_recorded(backend, fp32_onnx, tiny_inputs, torch_logits, tmp_path):
    engine = backend.build(fp32_onnx, tmp_path / "engine", BuildConfig(variant="default_precision"))
    assert "INFERENCE_PRECISION_HINT" not in engine.build_config
    reported = engine.build_config["inference_precision_reported"]
    assert engine.precision == reported
    assert reported in {"fp32", "bf16", "fp16"}
    assert any(reported in note for note in engine.notes)
    (logits,) = backend.load(engine).run(tiny_inputs)
    assert sqnr_db(torch_logits, logits) > QDQ_MIN_SQNR_DB  # bf16 or better


def test_qdq_engine_is_int8_and_close_to_fp32(
    backend, qdq_onnx, tiny_inputs, torch_logits, tmp_path
):
    engine = backend.build(qdq_onnx, tmp_path / "engine", BuildConfig(variant="compiled"))
    assert engine.precision == "int8"
    assert engine.build_config["INFERENCE_PRECISION_HINT"] == "f32"
    runtime = engine.build_config["runtime_precisions"]
    assert runtime and all(key.split(":")[1] in {"u8", "i8"} for key in runtime), runtime
    (logits,) = backend.load(engine).run(tiny_inputs)
    assert sqnr_db(torch_logits, logits) > QDQ_MIN_SQNR_DB


def test_corrupt_file_is_a_backend_error(backend, corrupt_onnx, tmp_path):
    with pytest.raises(BackendError, match="not a valid ONNX model"):
        backend.build(corrupt_onnx, tmp_path / "engine", BuildConfig())
    assert not any(tmp_path.iterdir())


def test_missing_file_is_a_backend_error(backend, tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        backend.build(tmp_path / "nope.onnx", tmp_path / "engine", BuildConfig())


def test_unsupported_op_is_a_backend_error(backend, custom_op_onnx, tmp_path):
    with pytest.raises(BackendError, match="Frobnicate"):
        backend.build(custom_op_onnx, tmp_path / "engine", BuildConfig())


def test_unknown_variant_is_a_backend_error(backend, fp32_onnx, tmp_path):
    with pytest.raises(BackendError, match="unknown build variant 'int4'"):
        backend.build(fp32_onnx, tmp_path / "engine", BuildConfig(variant="int4"))

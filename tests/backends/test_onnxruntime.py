"""The onnxruntime backend and the backend registry, on tiny models built in code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploycomp.artifacts import Engine
from deploycomp.backends import availability_table, backend_names, get_backend
from deploycomp.backends.base import BuildConfig
from deploycomp.errors import BackendError
from deploycomp.measure.accuracy import sqnr_db

FP32_ATOL = 1e-4
QDQ_MIN_SQNR_DB = 25.0


@pytest.fixture(scope="module")
def backend():
    return get_backend("onnxruntime")


def test_registry_lists_backends_in_order():
    assert backend_names() == ["onnxruntime", "openvino", "tensorrt", "torch"]
    assert [name for name, _ in availability_table()] == backend_names()


def test_registry_unknown_name_lists_known_and_suggests():
    with pytest.raises(BackendError, match="onnxruntime.*openvino.*tensorrt") as info:
        get_backend("openvion")
    assert "Did you mean 'openvino'?" in str(info.value)


def test_importing_backends_imports_no_backend_library():
    code = (
        "import sys, deploycomp.backends as b; b.availability_table(); "
        "print([m for m in ('onnxruntime', 'openvino', 'tensorrt') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("variant", ["fp32", "default_precision"])
def test_fp32_engine_matches_torch(
    backend, fp32_onnx, tiny_inputs, torch_logits, tmp_path, variant
):
    engine = backend.build(fp32_onnx, tmp_path / "engine", BuildConfig(variant=variant))
    assert engine.precision == "fp32"
    assert (tmp_path / "engine" / "model.ort.onnx").is_file()
    assert Engine.load(tmp_path / "engine" / "engine.json") == engine
    assert engine.build_config["graph_optimization_level"] == "ORT_ENABLE_ALL"
    if variant == "default_precision":
        assert any("fp32 by default" in note for note in engine.notes)
    session = backend.load(engine, threads=1)
    assert list(session.input_names) == ["image"]
    (logits,) = session.run(tiny_inputs)
    np.testing.assert_allclose(logits, torch_logits, atol=FP32_ATOL, rtol=0)


def test_qdq_engine_is_int8_and_close_to_fp32(
    backend, qdq_onnx, tiny_inputs, torch_logits, tmp_path
):
    engine = backend.build(qdq_onnx, tmp_path / "engine", BuildConfig(variant="compiled"))
    assert engine.precision == "int8"
    (logits,) = backend.load(engine).run(tiny_inputs)
    assert sqnr_db(torch_logits, logits) > QDQ_MIN_SQNR_DB


def test_corrupt_file_is_a_backend_error(backend, corrupt_onnx, tmp_path):
    with pytest.raises(BackendError, match="not a valid ONNX model"):
        backend.build(corrupt_onnx, tmp_path / "engine", BuildConfig())
    assert not (tmp_path / "engine").exists()
    assert not any(tmp_path.iterdir())  # no partial artifacts


def test_missing_file_is_a_backend_error(backend, tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        backend.build(tmp_path / "nope.onnx", tmp_path / "engine", BuildConfig())


def test_unsupported_op_names_the_operator(backend, custom_op_onnx, tmp_path):
    with pytest.raises(BackendError, match="Frobnicate"):
        backend.build(custom_op_onnx, tmp_path / "engine", BuildConfig())


def test_engine_of_another_backend_is_refused(backend, fp32_onnx, tmp_path):
    engine = backend.build(fp32_onnx, tmp_path / "engine", BuildConfig())
    data = json.loads(Path(tmp_path / "engine" / "engine.json").read_text())
    data["backend"] = "openvino"
    with pytest.raises(BackendError, match="cannot be loaded"):
        backend.load(Engine.from_dict(data))
    assert engine.backend == "onnxruntime"


def test_tensorrt_is_unavailable_here_with_a_reason(tmp_path, fp32_onnx):
    trt = get_backend("tensorrt")
    avail = trt.availability()
    if avail.available:
        pytest.skip("TensorRT and a GPU are present on this machine")
    assert "TensorRT is not installed" in avail.reason or "no NVIDIA GPU" in avail.reason
    with pytest.raises(BackendError, match="unavailable"):
        trt.build(fp32_onnx, tmp_path / "engine", BuildConfig(device="cuda:0"))

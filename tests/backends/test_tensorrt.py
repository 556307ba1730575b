"""The tensorrt backend on our side of the API: its availability here, and the normalization of the
engine inspector's layer information into layers.json. TensorRT itself is not needed."""

from __future__ import annotations

import json

import pytest

from deploycomp.backends import BuildConfig
from deploycomp.backends import tensorrt as trt_backend
from deploycomp.backends.tensorrt import (
    DENSE_2_4_NOTE,
    TensorRtBackend,
    parse_layer_information,
    read_layer_information,
)
from deploycomp.errors import BackendError
from deploycomp.report.engine_layers import read_engine_layers, write_engine_layers

FC1, FC3 = "/classifier/classifier.1/Gemm", "/classifier/classifier.3/Gemm"

# Follows the layer information TensorRT documents for IEngineInspector.get_engine_information(
# LayerInformationFormat.JSON) of an engine built with ProfilingVerbosity.DETAILED (TensorRT 10
# field names): fused layer names joined by " + ", "Metadata" naming the ONNX nodes as
# "[ONNX Layer: name]" separated by a raw U+001E, the tensor type inside "Format/Datatype",
# "Weights" with its type, "TacticName" the kernel. TensorRT's sparse tensor-core kernels carry
# "sparse" in the tactic name. The last layer writes its tensors the TensorRT 11 way, with a
# "DataType" field of its own, as the 11.x "I/O Tensors" entries do.
LAYER_INFORMATION = """{"Layers": [
{"Name": "Reformatting CopyNode for Input Tensor 0 to /features/features.0/Conv",
 "LayerType": "Reformat", "ParameterType": "Reformat", "Origin": "REFORMAT",
 "Inputs": [{"Name": "input", "Location": "Device", "Dimensions": [64,1,28,28],
             "Format/Datatype": "Row major linear FP32 format (kLINEAR)"}],
 "Outputs": [{"Name": "input_q", "Location": "Device", "Dimensions": [64,1,28,28],
              "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
 "TacticValue": "0x0000000000000000"},
{"Name": "features.0.weight + /features/features.0/Conv + /features/features.2/Relu",
 "LayerType": "CaskConvolution", "ParameterType": "Convolution",
 "Metadata": "[ONNX Layer: /features/features.0/Conv]\x1e[ONNX Layer: /features/features.2/Relu]",
 "Inputs": [{"Name": "input_q", "Format/Datatype": "Int8"}],
 "Outputs": [{"Name": "relu1", "Format/Datatype": "Int8"}],
 "Weights": {"Type": "Int8", "Count": 288}, "Bias": {"Type": "Float", "Count": 32},
 "AllowSparse": 1,
 "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32"},
{"Name": "flatten_noop", "LayerType": "NoOp", "Inputs": [], "Outputs": []},
{"Name": "classifier.1.weight + /classifier/classifier.1/Gemm + /classifier/classifier.2/Relu",
 "LayerType": "CaskGemmConvolution", "ParameterType": "Convolution",
 "Metadata": "[ONNX Layer: /classifier/classifier.1/Gemm]\x1e[ONNX Layer: /classifier/classifier.2/Relu]",
 "Inputs": [{"Name": "flat", "Format/Datatype": "Int8"}],
 "Outputs": [{"Name": "relu2", "Format/Datatype": "Int8"}],
 "Weights": {"Type": "Int8", "Count": 401408},
 "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32_nchw_vect_c_32"},
{"Name": "classifier.3.weight + /classifier/classifier.3/Gemm",
 "LayerType": "CaskGemmConvolution", "ParameterType": "Convolution",
 "Inputs": [{"Name": "relu2", "Format/Datatype": "Int8"}],
 "Outputs": [{"Name": "output", "Format/Datatype": "Row major linear FP32 format (kLINEAR)"}],
 "Weights": {"Type": "Int8", "Count": 1280},
 "TacticName": "sm80_xmma_gemm_i8i8_i8i32_f32_tn_n_tilesize32x32x64"},
{"Name": "/up/MatMul", "LayerType": "kgen", "Metadata": "[ONNX Layer: /up/MatMul]",
 "Inputs": [{"Name": "h", "DataType": "Half", "Format": "Row major linear FP16 format"},
            {"Name": "up_weight", "DataType": "Int4", "Format": "Row major linear"}],
 "Outputs": [{"Name": "up", "DataType": "Half", "Format": "Row major linear FP16 format"}],
 "TacticName": "gemm_woq_int4"}
],
"Bindings": ["input", "output"]}"""


@pytest.fixture
def layers():
    raw = read_layer_information(LAYER_INFORMATION)
    return {layer.name.split(" + ")[1] if " + " in layer.name else layer.name: layer
            for layer in parse_layer_information(raw, {FC1, FC3})}  # fmt: skip


def test_raw_separator_in_metadata_is_read(layers):
    # Strict JSON forbids the raw U+001E TensorRT writes between the Metadata entries.
    with pytest.raises(json.JSONDecodeError):
        json.loads(LAYER_INFORMATION)
    assert "flatten_noop" not in layers and len(layers) == 5  # NoOp layers do no work


def test_precision_and_op_per_layer(layers):
    reformat = layers["Reformatting CopyNode for Input Tensor 0 to /features/features.0/Conv"]
    assert (reformat.op, reformat.precision) == ("reformat", "fp32")
    conv = layers["/features/features.0/Conv"]
    assert (conv.op, conv.precision, conv.sparse, conv.sparse_weights) == (
        "conv",
        "int8",
        False,
        False,
    )
    assert conv.kernel.startswith("sm80_xmma_fprop_implicit_gemm")
    assert layers["/up/MatMul"].precision == "int4 w-only"  # TensorRT 11 "DataType" fields
    assert layers["/up/MatMul"].op == "kgen"


def test_sparse_tactic_and_dense_2_4_note(layers):
    fc1 = layers[FC1]
    assert (fc1.sparse, fc1.sparse_weights, fc1.note) == (True, True, "")
    # No Metadata: the 2:4 node is found in the fused layer name.
    fc3 = layers[FC3]
    assert (fc3.sparse, fc3.sparse_weights, fc3.note) == (False, True, DENSE_2_4_NOTE)
    assert fc3.precision == "int8"


def test_layers_json_round_trips(layers, tmp_path):
    write_engine_layers(tmp_path, "tensorrt", list(layers.values()))
    assert read_engine_layers(tmp_path) == list(layers.values())
    assert json.loads((tmp_path / "layers.json").read_text())["backend"] == "tensorrt"
    assert read_engine_layers(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"Layers": ["conv1 + relu1", "fc"]}, "ProfilingVerbosity.DETAILED"),
        ({"Bindings": []}, "no 'Layers' list"),
    ],
)
def test_unusable_layer_information_is_an_error(raw, match):
    with pytest.raises(BackendError, match=match):
        parse_layer_information(raw, set())
    with pytest.raises(BackendError, match="not JSON"):
        read_layer_information("{truncated")


def test_unavailable_here_and_build_says_why(fp32_onnx, tmp_path):
    backend = TensorRtBackend()
    avail = backend.availability()
    if avail.available:
        pytest.skip(f"TensorRT is available here: {avail.reason}")
    assert "TensorRT" in avail.reason
    with pytest.raises(BackendError, match="unavailable") as info:
        backend.build(fp32_onnx, tmp_path / "engine", BuildConfig(device="cuda:0"))
    assert avail.reason in str(info.value)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize(
    ("installed", "gpu", "reasons"),
    [
        (False, False, ("TensorRT is not installed", "no NVIDIA GPU")),
        (False, True, ("TensorRT is not installed",)),
        (True, False, ("no NVIDIA GPU is visible to CUDA (TensorRT runs on NVIDIA GPUs only)",)),
    ],
)
def test_availability_names_each_missing_piece(monkeypatch, installed, gpu, reasons):
    spec = object() if installed else None
    monkeypatch.setattr(trt_backend.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(trt_backend, "_cuda_available", lambda: gpu)
    avail = TensorRtBackend().availability()
    assert not avail.available
    assert all(reason in avail.reason for reason in reasons)
    assert ("pypi.nvidia.com" in avail.reason) == (not installed)


def test_availability_never_raises(monkeypatch):
    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(trt_backend, "_cuda_available", broken)
    avail = TensorRtBackend().availability()
    assert not avail.available and "CUDA driver initialization failed" in avail.reason

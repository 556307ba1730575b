"""Tiny seeded models exported to ONNX in code: an fp32 conv+linear net and its QDQ variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

INPUT_NAME = "image"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        )
        self.classifier = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def tiny_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {INPUT_NAME: rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="session")
def torch_logits(tiny_model, tiny_inputs) -> np.ndarray:
    with torch.no_grad():
        return tiny_model(torch.from_numpy(tiny_inputs[INPUT_NAME])).numpy()


@pytest.fixture(scope="session")
def fp32_onnx(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model_fp32.onnx"
    torch.onnx.export(
        tiny_model,
        (torch.zeros(1, 3, 16, 16),),
        str(path),
        input_names=[INPUT_NAME],
        output_names=["logits"],
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="session")
def qdq_onnx(fp32_onnx, tmp_path_factory) -> Path:
    """A QDQ model from onnxruntime's static quantizer on random calibration data."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class RandomReader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self._batches = iter(
                {INPUT_NAME: rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
                for _ in range(8)
            )

        def get_next(self):
            return next(self._batches, None)

    path = tmp_path_factory.mktemp("onnx") / "model_qdq.onnx"
    quantize_static(
        str(fp32_onnx),
        str(path),
        RandomReader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return path


@pytest.fixture(scope="session")
def corrupt_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "corrupt.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf model\xff\xfe" * 4)
    return path


@pytest.fixture(scope="session")
def custom_op_onnx(tmp_path_factory) -> Path:
    """A valid ONNX file whose one node is an operator no backend implements."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob0", domain="com.example")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path_factory.mktemp("onnx") / "custom_op.onnx"
    onnx.save(model, str(path))
    return path

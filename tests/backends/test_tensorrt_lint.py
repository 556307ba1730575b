"""TensorRT's explicit-quantization rules checked on the QDQ ONNX deploycomp writes for the zoo's
fmnist-cnn (INT8, 2:4 + INT8, INT4 weight-only), and on mutations of it that break one rule each.
TensorRT itself is not needed: the linter and the lowering before it are our side of the API.
The last test builds and runs a real engine where TensorRT and a GPU exist (marker ``tensorrt``).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploycomp import zoo
from deploycomp.backends import BuildConfig, get_backend
from deploycomp.backends.tensorrt import fold_bias_dequantize, prepare_onnx
from deploycomp.backends.tensorrt_lint import (
    ERROR,
    NOTE,
    WARNING,
    lint_qdq_for_tensorrt,
    sparse_weight_nodes,
)
from deploycomp.errors import BackendError
from deploycomp.export.calibrate import calibrate
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq, is_transparent
from deploycomp.kernels.sparsity import apply_2_4
from deploycomp.measure.accuracy import sqnr_db
from deploycomp.plan.inventory import build_inventory

CONV1, CONV2 = "/features/features.0/Conv", "/features/features.4/Conv"
FC1, FC3 = "/classifier/classifier.1/Gemm", "/classifier/classifier.3/Gemm"
W8A8 = ("int8_sym_per_tensor", "int8_sym_per_channel")
INT8_PLAN = {name: W8A8 for name in ("features.0", "features.4", "classifier.1", "classifier.3")}
# The first convolution (reduction 1 x 3 x 3 = 9) cannot be 2:4; the other three are pruned.
PRUNED = ("features.4", "classifier.1", "classifier.3")
INT4_PLAN = {
    "features.0": W8A8,
    "features.4": W8A8,
    "classifier.1": ("fp32", "int4_sym_group64"),  # 3136 = 49 x 64 (128 does not divide it)
    "classifier.3": ("fp32", "int4_sym_group64"),
}


@pytest.fixture(scope="module")
def spec():
    return zoo.load("fmnist-cnn", eval_limit=64)


def _export(spec, tmp_path_factory, plan: dict[str, tuple[str, str]]) -> onnx.ModelProto:
    """The QDQ model deploycomp's exporter writes for ``plan`` (layer -> activation, weight)."""
    fp32 = export_fp32(spec, tmp_path_factory.mktemp("fmnist") / "model_fp32.onnx")
    layers = {la.name: la for la in build_inventory(fp32, spec.dims(1))}
    quant = {layers[n].node: LayerQuant(layers[n], act, w) for n, (act, w) in plan.items()}
    sites = activation_sites(fp32, {node for node, q in quant.items() if q.activation != "fp32"})
    ranges = calibrate(fp32, sorted(set(sites.values())), spec.calibration, progress=False)
    model = insert_qdq(fp32, quant, ranges)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def int8_model(spec, tmp_path_factory):
    return _export(spec, tmp_path_factory, INT8_PLAN)


@pytest.fixture(scope="module")
def sparse_model(spec, tmp_path_factory):
    model = copy.deepcopy(spec.model)
    with torch.no_grad():
        for name in PRUNED:
            weight = model.get_submodule(name).weight
            weight.copy_(apply_2_4(weight))
    return _export(dataclasses.replace(spec, model=model), tmp_path_factory, INT8_PLAN)


@pytest.fixture(scope="module")
def int4_model(spec, tmp_path_factory):
    return _export(spec, tmp_path_factory, INT4_PLAN)


def _by_severity(issues, severity):
    return [i for i in issues if i.severity == severity]


def _int32_biases(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes reading an int32 initializer: the exporter's quantized biases."""
    int32 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT32}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in int32 for n in model.graph.node)


@pytest.mark.parametrize("plan", ["int8", "2:4+int8", "int4 weight-only"])
def test_exported_plans_pass_after_bias_folding(plan, int8_model, sparse_model, int4_model):
    model = {"int8": int8_model, "2:4+int8": sparse_model, "int4 weight-only": int4_model}[plan]
    # As exported: the only errors are the int32 biases of the W8A8 Conv/Gemm nodes, which
    # TensorRT rejects and the lowerer folds.
    raw_errors = _by_severity(lint_qdq_for_tensorrt(model), ERROR)
    assert {i.rule for i in raw_errors} == {"int32-bias"}
    assert len(raw_errors) == _int32_biases(model) > 0
    lowered, folded = fold_bias_dequantize(model)
    assert folded == len(raw_errors) and _int32_biases(lowered) == 0
    onnx.checker.check_model(lowered, full_check=True)
    issues = lint_qdq_for_tensorrt(lowered)
    assert _by_severity(issues, ERROR) == [] and _by_severity(issues, WARNING) == []
    # INT8 out: every INT8 layer's output is re-quantized except the network's last one (and,
    # INT4 plan, the convolution feeding the weight-only classifier).
    last_int8 = CONV2 if plan == "int4 weight-only" else FC3
    assert [(i.node, i.rule) for i in _by_severity(issues, NOTE)] == [(last_int8, "output-float")]


def test_int4_plan_stores_blocked_int4_weights_for_the_linear_layers(int4_model):
    int4 = [i for i in int4_model.graph.initializer if i.data_type == TensorProto.INT4]
    assert sorted(tuple(i.dims) for i in int4) == [(128, 10), (3136, 128)]  # MatMul [K, N]
    blocked = [n for n in int4_model.graph.node if n.input[0] in {i.name for i in int4}]
    assert all(helper.get_attribute_value(a) == 64
               for n in blocked for a in n.attribute if a.name == "block_size")  # fmt: skip


def test_sparse_weight_nodes_finds_the_pruned_layers(int8_model, sparse_model, int4_model):
    assert sparse_weight_nodes(sparse_model) == {CONV2, FC1, FC3}
    assert sparse_weight_nodes(int8_model) == set()
    assert sparse_weight_nodes(int4_model) == set()


def test_folded_biases_compute_the_same_outputs(int8_model, spec):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    batch = spec.calibration[0]
    outputs = [
        ort.InferenceSession(m.SerializeToString(), options).run(None, batch)[0]
        for m in (int8_model, fold_bias_dequantize(int8_model)[0])
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-5)


# --- mutations: each breaks one rule -----------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _input_dq(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    """The DequantizeLinear feeding a node's activation input, above MaxPool/Flatten."""
    node = _producer(model, _node(model, name).input[0])
    while node.op_type != "DequantizeLinear":
        assert is_transparent(node, {})
        node = _producer(model, node.input[0])
    return node


def _set_init(model: onnx.ModelProto, tensor: onnx.TensorProto) -> None:
    inits = model.graph.initializer
    index = next((i for i, t in enumerate(inits) if t.name == tensor.name), None)
    if index is None:
        inits.append(tensor)
    else:
        inits[index].CopyFrom(tensor)


def _lint_errors(model: onnx.ModelProto) -> list:
    onnx.checker.check_model(model, full_check=True)  # a graph ONNX allows, TensorRT does not
    return _by_severity(lint_qdq_for_tensorrt(fold_bias_dequantize(model)[0]), ERROR)


def test_nonzero_zero_point(int8_model):
    model = _copy(int8_model)
    dq = _input_dq(model, FC3)
    quant = _producer(model, dq.input[0])
    _set_init(model, numpy_helper.from_array(np.array(3, np.int8), dq.input[2]))
    errors = _lint_errors(model)
    assert {i.rule for i in errors} == {"zero-point"}
    assert {i.node for i in errors} == {dq.name, quant.name}  # the pair shares the zero point
    assert "holds [3.0]" in errors[0].message


def test_uint8_activation(spec, tmp_path_factory):
    # The exporter's uint8 scheme (zero point 0, for a post-ReLU input) is what CPU plans use.
    model = _export(spec, tmp_path_factory, {**INT8_PLAN, "classifier.3": (
        "uint8_per_tensor", "int8_sym_per_channel")})  # fmt: skip
    errors = _lint_errors(model)
    assert {i.rule for i in errors} == {"uint8"}
    assert len(errors) == 2  # its QuantizeLinear and DequantizeLinear


def test_weight_scale_on_the_wrong_axis(int8_model):
    # classifier.1 is a Gemm with transB=1: its weight [128, 3136] is scaled per row (axis 0).
    model = _copy(int8_model)
    dq = _producer(model, _node(model, FC1).input[1])
    for attr in dq.attribute:
        if attr.name == "axis":
            attr.i = 1
    dq.input[1], dq.input[2] = "fc1_scale_axis1", "fc1_zero_point_axis1"
    _set_init(model, numpy_helper.from_array(np.full(3136, 0.01, np.float32), dq.input[1]))
    _set_init(model, numpy_helper.from_array(np.zeros(3136, np.int8), dq.input[2]))
    errors = _lint_errors(model)
    assert [(i.node, i.rule) for i in errors] == [(dq.name, "weight-axis")]
    assert "axis 1 of the Gemm weight of shape (128, 3136)" in errors[0].message


def test_int8_weight_only_matmul_is_axis_1_and_warns_float_input(spec, tmp_path_factory):
    # A weight-only Gemm is written as MatMul with the weight [K, N]: its output axis is 1.
    model = _export(spec, tmp_path_factory, {**INT8_PLAN, "classifier.3": (
        "fp32", "int8_sym_per_channel")})  # fmt: skip
    assert _node(model, FC3).op_type == "MatMul"
    issues = lint_qdq_for_tensorrt(fold_bias_dequantize(model)[0])
    assert _by_severity(issues, ERROR) == []
    assert [(i.node, i.rule) for i in _by_severity(issues, WARNING)] == [(FC3, "int8-input-float")]


def test_int4_quantize_on_an_activation(int4_model):
    model = _copy(int4_model)
    dq = _input_dq(model, CONV2)
    quant = _producer(model, dq.input[0])
    _set_init(model, helper.make_tensor(dq.input[2], TensorProto.INT4, [], [0]))
    errors = _lint_errors(model)
    assert {i.rule for i in errors} == {"int4-activation"}
    assert {i.node for i in errors} == {dq.name, quant.name}


def test_int4_weight_into_a_convolution(int4_model):
    # The exporter refuses INT4 convolutions; a hand-edited graph must still be caught.
    model = _copy(int4_model)
    dq = _producer(model, _node(model, CONV2).input[1])
    codes = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == dq.input[0])
    ).astype(np.int64)
    codes = np.clip(codes, -7, 7)  # [64, 32, 3, 3], blocked by 64 along the output channels
    del dq.input[:]
    dq.input.extend(["conv2_w_int4", "conv2_w_int4_scale"])
    del dq.attribute[:]
    dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", 64)])
    _set_init(model, helper.make_tensor("conv2_w_int4", TensorProto.INT4, codes.shape,
                                        codes.flatten().tolist()))  # fmt: skip
    _set_init(model, numpy_helper.from_array(np.full((1, 32, 3, 3), 0.01, np.float32),
                                             "conv2_w_int4_scale"))  # fmt: skip
    errors = _lint_errors(model)
    assert [(i.node, i.rule) for i in errors] == [(dq.name, "int4-consumer")]
    assert "Conv" in errors[0].message


def test_int4_block_size_tensorrt_does_not_run(spec, tmp_path_factory):
    model = _export(spec, tmp_path_factory, {**INT4_PLAN, "classifier.3": (
        "fp32", "int4_sym_group32")})  # fmt: skip
    errors = _lint_errors(model)
    assert {i.rule for i in errors} == {"int4-block-size"} and len(errors) == 1


def test_prepare_onnx_fails_listing_the_errors(int8_model, tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(int8_model, str(good))
    prepared = prepare_onnx(good)
    assert prepared.folded_biases == 4 and prepared.warnings == []
    assert len(prepared.notes) == 1
    model = _copy(int8_model)
    _set_init(model, numpy_helper.from_array(np.array(3, np.int8), _input_dq(model, FC3).input[2]))
    onnx.save(model, str(bad))
    with pytest.raises(BackendError, match=r"(?s)breaks 2 of TensorRT's .*\[zero-point\]"):
        prepare_onnx(bad)


@pytest.mark.tensorrt
def test_sparse_int8_engine_builds_runs_and_reports_its_layers(sparse_model, spec, tmp_path):
    import onnxruntime as ort

    from deploycomp.report.engine_layers import read_engine_layers

    backend = get_backend("tensorrt")
    path = tmp_path / "model.onnx"
    onnx.save(sparse_model, str(path))
    engine = backend.build(path, tmp_path / "engine", BuildConfig(device="cuda:0"))
    batch = spec.calibration[0]
    session = backend.load(engine)
    (logits,) = session.run(batch)
    reference = ort.InferenceSession(str(path)).run(None, batch)[0]
    assert sqnr_db(reference, logits) > 25.0  # INT8 requantization differs between engines
    call = session.bind(batch)  # what latency measurement times: inputs stay on the device
    call()
    np.testing.assert_allclose(call.buffers[-1].cpu().numpy(), logits, rtol=0, atol=1e-6)
    layers = read_engine_layers(tmp_path / "engine")
    assert any(layer.precision == "int8" for layer in layers)
    # Metadata maps TensorRT's fused layers back to the pruned ONNX nodes.
    assert any(layer.sparse_weights for layer in layers)
    for layer in layers:
        if layer.sparse_weights and not layer.sparse:
            assert layer.note
    assert (tmp_path / "engine" / "tensorrt_layers.json").is_file()
